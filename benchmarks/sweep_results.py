"""Print the tables of docs/explanation/results.md's sweep section from a finished store of
``jobs/sweep-mnist1d.toml`` (or any study with [tests] factors and [train] save_epochs).

    python benchmarks/sweep_results.py stores/sweep-mnist1d

1. the last epoch, per arch, layer and method: each factor's closed-set accuracy (chance in
   the header) and PERMANOVA R^2 (sequential) with partial R^2;
2. along training, per arch and method at each layer: the task's closed-set accuracy and
   PERMANOVA R^2 at every saved epoch, and the models' mean test accuracy;
3. the stage times.
Every number is read from the store.
"""

from __future__ import annotations

import json
import sys

import polars as pl

import distsim


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main(path: str) -> None:
    res = distsim.open(path)
    study = res.study
    tests = res.tests().with_columns(
        pl.col("extra").map_elements(lambda e: json.loads(e).get("partial_r2"),
                                     return_dtype=pl.Float64).alias("partial_r2"))
    factors = list(study.tests.factors or ["task"])
    last = tests["epoch"].max()
    print(f"## last epoch ({last}): closed-set acc (chance) | PERMANOVA R^2 / partial R^2\n")
    at = tests.filter(pl.col("epoch") == last)
    for arch in study.arch_names:
        chance = {f: at.filter((pl.col("factor") == f) & (pl.col("protocol") == "closed-set"))
                  ["chance"].max() for f in factors}
        head = " | ".join([f"acc {f} ({_fmt(chance[f])})" for f in factors]
                          + [f"R2 {f}" for f in factors])
        print(f"| {arch} layer | method | {head} |")
        print("|" + "---|" * (2 + 2 * len(factors)))
        for layer in study.feature_layers(arch):
            for method in study.features.methods:
                cell = at.filter((pl.col("arch") == arch) & (pl.col("layer") == layer)
                                 & (pl.col("method") == method))

                def one(protocol: str, factor: str, col: str, c: pl.DataFrame = cell
                        ) -> float | None:
                    r = c.filter((pl.col("protocol") == protocol) & (pl.col("factor") == factor))
                    return None if r.height == 0 else r[col][0]
                accs = [_fmt(one("closed-set", f, "observed")) for f in factors]
                r2s = [f"{_fmt(one('permanova', f, 'r2'), 3)} / "
                       f"{_fmt(one('permanova', f, 'partial_r2'), 3)}" for f in factors]
                print(f"| {layer} | {method} | {' | '.join(accs + r2s)} |")
        print()

    models = res.models()
    acc = models.group_by("arch", "epoch").agg(pl.col("test_acc").mean()).sort("arch", "epoch")
    print("## along training: task closed-set acc | task PERMANOVA R^2, per epoch\n")
    for arch in study.arch_names:
        epochs = sorted(set(tests.filter(pl.col("arch") == arch)["epoch"].drop_nulls()))
        mean_acc = {e: a for _, e, a in acc.filter(pl.col("arch") == arch).iter_rows()}
        print(f"| {arch} layer | method | " + " | ".join(f"e{e}" for e in epochs) + " |")
        print("|" + "---|" * (2 + len(epochs)))
        print("| (models) | test acc | " + " | ".join(_fmt(mean_acc.get(e)) for e in epochs)
              + " |")
        for layer in study.feature_layers(arch):
            for method in study.features.methods:
                sel = tests.filter((pl.col("arch") == arch) & (pl.col("layer") == layer)
                                   & (pl.col("method") == method) & (pl.col("factor") == "task"))
                cells = []
                for e in epochs:
                    a = sel.filter((pl.col("epoch") == e) & (pl.col("protocol") == "closed-set"))
                    r = sel.filter((pl.col("epoch") == e) & (pl.col("protocol") == "permanova"))
                    cells.append(f"{_fmt(a['observed'][0] if a.height else None)} | "
                                 f"{_fmt(r['r2'][0] if r.height else None, 3)}")
                print(f"| {layer} | {method} | " + " | ".join(cells) + " |")
        print()
    print("## stages\n")
    for stage, info in res.store.stages().items():
        print(f"{stage}: {info.get('seconds')} s", {k: v for k, v in info.items()
                                                    if k not in ("stage", "seconds")})


if __name__ == "__main__":
    main(sys.argv[1])
