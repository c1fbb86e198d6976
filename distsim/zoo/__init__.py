"""The zoo: the networks a study trains and what they are trained on (torch and numpy, no Ray).

``tasks`` builds a study's labelled tasks offline (digits, MNIST-1D from ``datasets``, a
user's npz, synthetic mixtures); ``models`` builds the MLP, CNN and GRU classifiers; ``train``
trains a pack of seeds of one architecture at once. Their sections of the study file
(``DataConfig``, ``ArchConfig``, ``TrainConfig``) are plain data in :mod:`distsim.config`.
This package imports nothing itself: ``import distsim.zoo.tasks`` loads no torch.
"""
