"""Print the tables of docs/explanation/results.md's sweep, ResNet and transformer sections from
a finished store of ``jobs/sweep-mnist1d.toml``, ``jobs/resnet-mnist1d.toml`` or
``jobs/transformer-mnist1d.toml`` (any study with [tests] factors; [train] save_epochs for 2).

    python benchmarks/sweep_results.py stores/sweep-mnist1d

1. the last epoch (the final models without save_epochs), per arch, layer and method: each
   factor's closed-set accuracy (chance in the header), the task's open-set mAP (its chance),
   and PERMANOVA R^2 (sequential) with partial R^2;
2. along training (with save_epochs), per arch and method at each layer: the task's
   closed-set accuracy and PERMANOVA R^2 at every saved epoch, and the models' mean test
   accuracy; without: the models' mean and minimum test accuracy per factor value;
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
    at = tests.filter(pl.col("epoch") == last if last is not None else pl.col("epoch").is_null())
    open_set = at.filter((pl.col("factor") == "task") & (pl.col("protocol") == "open-set"))
    for arch in study.arch_names:
        chance = {f: at.filter((pl.col("factor") == f) & (pl.col("protocol") == "closed-set"))
                  ["chance"].max() for f in factors}
        open_chance = open_set.filter(pl.col("arch") == arch)["chance"].max()
        head = " | ".join([f"acc {f} ({_fmt(chance[f])})" for f in factors]
                          + ([f"mAP task ({_fmt(open_chance)})"] if open_set.height else [])
                          + [f"R2 {f}" for f in factors])
        print(f"| {arch} layer | method | {head} |")
        print("|" + "---|" * (2 + 2 * len(factors) + (1 if open_set.height else 0)))
        for layer in study.feature_layers(arch):
            for method in study.features.methods:
                cell = at.filter((pl.col("arch") == arch) & (pl.col("layer") == layer)
                                 & (pl.col("method") == method))

                def one(protocol: str, factor: str, col: str, c: pl.DataFrame = cell
                        ) -> float | None:
                    r = c.filter((pl.col("protocol") == protocol) & (pl.col("factor") == factor))
                    return None if r.height == 0 else r[col][0]
                accs = [_fmt(one("closed-set", f, "observed")) for f in factors]
                if open_set.height:
                    accs.append(_fmt(one("open-set", "task", "observed")))
                r2s = [f"{_fmt(one('permanova', f, 'r2'), 3)} / "
                       f"{_fmt(one('permanova', f, 'partial_r2'), 3)}" for f in factors]
                print(f"| {layer} | {method} | {' | '.join(accs + r2s)} |")
        print()

    models = res.models()
    if last is None:
        _accuracy_by_factor(models, factors)
        _stages(res)
        return
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
    _stages(res)


def _accuracy_by_factor(models: pl.DataFrame, factors: list[str]) -> None:
    print("## models' test accuracy (mean / min) per factor value\n")
    for f in (f for f in factors if f != "task"):  # Results.models() has a column per factor
        by = models.group_by("arch", f).agg(
            pl.col("test_acc").mean().alias("mean"), pl.col("test_acc").min().alias("min"),
            pl.len().alias("models")).sort("arch", f)
        for arch, value, mean, low, n in by.iter_rows():
            print(f"{arch} {f}={value}: {mean:.3f} / {low:.3f} ({n} models)")
    print()


def _stages(res: distsim.Results) -> None:
    print("## stages\n")
    for stage, info in res.store.stages().items():
        print(f"{stage}: {info.get('seconds')} s", {k: v for k, v in info.items()
                                                    if k not in ("stage", "seconds")})


if __name__ == "__main__":
    main(sys.argv[1])
