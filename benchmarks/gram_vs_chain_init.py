"""How far ``gram`` is from ``chain-gram`` at init, at the hidden layers of the quickstart's MLP
and CNN (digits pair tasks: 1 x 8 x 8 inputs, 2 classes), over seeds.

For each seed the model is built by distsim.zoo.models.build under torch.manual_seed(seed) and
both features are taken at each hidden layer by distsim.weights.features.weight_features (full
features, no dim). With g the gram and c the chain-gram feature it reports, over the seeds
(min / median / max):

- rel2   = ||g - c||_2 / ||c||_2 (Euclidean norm of the feature vectors);
- relmax = max|g - c| / max|c|, the max-norm ratio tests/test_features.py's ``_rel`` uses;
- 1 - cos(g, c), cos = g . c / (||g|| ||c||): how far from parallel the two vectors are;
- ||g|| / ||c||: their length ratio.

    python benchmarks/gram_vs_chain_init.py [--seeds 20] [--study jobs/quickstart.toml]

At 'out' both equal to rounding (tests/test_features.py), so only hidden layers are shown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from distsim.config import load_study
from distsim.weights.features import feature_layers, weight_features
from distsim.zoo.models import build
from distsim.zoo.tasks import make_tasks

ROOT = Path(__file__).resolve().parents[1]


def measure(cfg, seeds: int) -> dict[str, dict[str, np.ndarray]]:
    """{hidden layer: {quantity: (seeds,) values}} for the arch config `cfg`."""
    layers = feature_layers(cfg)[:-1]
    out: dict[str, dict[str, list[float]]] = {
        layer: {"rel2": [], "relmax": [], "1-cos": [], "|g|/|c|": []} for layer in layers}
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = build(cfg)
        for layer in layers:
            g = weight_features(model, "gram", layer).astype(np.float64)
            c = weight_features(model, "chain-gram", layer).astype(np.float64)
            ng, nc = np.linalg.norm(g), np.linalg.norm(c)
            row = out[layer]
            row["rel2"].append(np.linalg.norm(g - c) / nc)
            row["relmax"].append(np.abs(g - c).max() / np.abs(c).max())
            row["1-cos"].append(1.0 - float(g @ c) / (ng * nc))
            row["|g|/|c|"].append(ng / nc)
    return {layer: {k: np.asarray(v) for k, v in q.items()} for layer, q in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--study", type=Path, default=ROOT / "jobs" / "quickstart.toml")
    args = parser.parse_args()
    study = load_study(args.study)
    task = make_tasks(study.data)[0]
    print(f"{args.seeds} seeds at init; input {task.input_shape}, {task.num_classes} classes; "
          "min / median / max over seeds")
    print(f"{'arch':<5} {'layer':<6} {'rel2':>20} {'relmax':>20} {'1 - cos':>23} "
          f"{'|g|/|c|':>20}")
    for name in study.arch_names:
        arch = study.arch(name)
        if arch.kind == "rnn":  # the GRU: chain-gram is gram (not normalized)
            continue
        cfg = arch.with_task_shape(task.input_shape, task.num_classes)
        for layer, q in measure(cfg, args.seeds).items():
            cells = [f"{v.min():.{d}f}/{np.median(v):.{d}f}/{v.max():.{d}f}"
                     for (k, v) in q.items() for d in [4 if k == "1-cos" else 3]]
            widths = [20, 20, 23, 20]
            print(f"{name:<5} {layer:<6} "
                  + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))


if __name__ == "__main__":
    main()
