"""Whether two stores hold the same tests table, value for value (a refactor's check).

Reads both stores' ``tests`` tables, sorts them by their key (arch, method, layer, protocol)
and compares every column exactly, the permutation nulls included, except ``seconds`` (a
timing) and ``upstream`` (a fingerprint of ``model_id@trial_id`` of the rows a test was
computed from: Ray Tune names each launch's trials afresh, so two launches of one study always
differ there). Exit code 0 when equal, 1 with the differing columns.

    python benchmarks/same_tests.py STORE_A STORE_B
"""

from __future__ import annotations

import argparse
import sys

import polars as pl

from distsim.store import Store

KEY = ["arch", "method", "layer", "protocol"]


def tests_table(path: str, ignore: list[str]) -> pl.DataFrame:
    return Store(path).scan("tests").collect().drop(ignore).sort(KEY)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()
    ignore = ["seconds", "upstream"]
    a, b = tests_table(args.a, ignore), tests_table(args.b, ignore)
    if a.shape != b.shape or a.columns != b.columns:
        print(f"different shapes or columns: {a.shape} {a.columns} vs {b.shape} {b.columns}")
        return 1
    differing = [c for c in a.columns if not a[c].equals(b[c], null_equal=True)]
    print(f"{a.height} tests x {a.width} columns compared (not {', '.join(ignore)}): "
          + (f"DIFFERENT in {', '.join(differing)}" if differing else "identical"))
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
