"""distsim: weight similarity of neural networks at scale (chain normalization, HTT) on Ray."""

__version__ = "0.2.0"
