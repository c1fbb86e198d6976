"""The README's Results table of a finished paper study, from its store alone.

One row per arch x layer x method: closed-set accuracy (chance), open-set mAP and CMC-1 (their
chance), PERMANOVA pseudo-F and R^2, PERMDISP F, the largest p and q of the row's tests, and
under it the stage times and the models' mean test accuracy per arch. With --ranks, also the
dimensions the Gram features span: the rank of each (arch, layer) chain-gram and gram feature
matrix, centred (singular values above 1e-6 of the largest; the features are float32).

    python benchmarks/paper_results.py [--ranks] stores/paper-mnist1d [stores/paper-digits ...]
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import polars as pl

import distsim
from distsim.report.page import number as _cell  # "-" for None or nan, else `digits` decimals


def table(path: str) -> str:
    """The markdown of one study: its results table, then its stages and accuracies."""
    res = distsim.open(path)
    tests = res.tests()
    lines = [f"**{res.study.name}** (`{path}`)", "",
             "| arch | layer | method | closed-set acc (chance) | open-set mAP (chance) "
             "| CMC-1 (chance) | PERMANOVA F | R^2 | PERMDISP F | max p | max q |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arch in res.study.arch_names:
        for layer in res.study.feature_layers(arch):
            for method in res.study.features.methods:
                mine = tests.filter((pl.col("arch") == arch) & (pl.col("layer") == layer)
                                    & (pl.col("method") == method))
                if mine.height == 0:
                    continue
                row = {r["protocol"]: r for r in mine.iter_rows(named=True)}

                def get(protocol: str, key: str, row: dict = row) -> Any:
                    r = row.get(protocol)
                    if r is None:
                        return None
                    if key in r:
                        return r[key]
                    return json.loads(r["extra"] or "{}").get(key)

                cs, os_ = (f"{_cell(get(p, 'observed'))} ({_cell(get(p, 'chance'))})"
                           for p in ("closed-set", "open-set"))
                cmc = (f"{_cell(get('open-set', 'cmc@1'))} "
                       f"({_cell(get('open-set', 'chance_cmc@1'))})")
                lines.append(
                    f"| {arch} | {layer} | {method} | {cs} | {os_} | {cmc} "
                    f"| {_cell(get('permanova', 'observed'), 1)} | {_cell(get('permanova', 'r2'))} "
                    f"| {_cell(get('permdisp', 'observed'), 2)} "
                    f"| {_cell(mine['p_value'].max(), 4)} | {_cell(mine['q_value'].max(), 4)} |")
    stages = res.store.stages()
    lines += ["", "| stage | seconds (all runs) | runs |", "|---|---|---|"]
    lines += [f"| {name} | {info.get('seconds_all_runs', info.get('seconds', float('nan'))):.0f} "
              f"| {info.get('runs', 1)} |" for name, info in stages.items()]
    acc = (res.models().filter(pl.col("status") == "ok").group_by("arch")
           .agg(pl.len().alias("models"), pl.col("test_acc").mean().alias("mean test acc")))
    lines += ["", "| arch | ok models | mean test accuracy |", "|---|---|---|"]
    lines += [f"| {a} | {n} | {m:.3f} |" for a, n, m in acc.sort("arch").iter_rows()]
    return "\n".join(lines)


def ranks(path: str) -> str:
    """The markdown table of the Gram features' ranks: dimensions of D they span over N models."""
    res = distsim.open(path)
    lines = ["| arch | layer | D | chain-gram rank | gram rank |", "|---|---|---|---|---|"]
    for arch in res.study.arch_names:
        for layer in res.study.feature_layers(arch):
            cells = []
            for method in ("chain-gram", "gram"):
                X = res.features(arch, layer, method)[2].astype(np.float64)
                s = np.linalg.svd(X - X.mean(axis=0), compute_uv=False)
                cells.append(str(int((s > 1e-6 * s[0]).sum())))
            lines.append(f"| {arch} | {layer} | {X.shape[1]} | {' | '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    paths = [a for a in sys.argv[1:] if a != "--ranks"]
    for p in paths:
        print(table(p), end="\n\n")
        if "--ranks" in sys.argv[1:]:
            print(ranks(p), end="\n\n")
