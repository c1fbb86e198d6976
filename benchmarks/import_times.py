"""What each ``distsim`` command spends importing, and which heavy libraries it loads.

Runs every command of the CLI on a finished study (and three bare imports) under
``python -X importtime``, sums the ``self`` column of every import (the seconds spent importing,
lazy imports inside the command included) and says whether torch, scipy.optimize, numba or ray
were imported. Each row is the median of ``--repeat`` runs; the wall time is the whole command's.
With ``--tree`` (repeatable: source folders holding a ``distsim/`` package, e.g. git worktrees
of two commits) each command runs from each tree in turn, interleaved, so a before/after
comparison shares the machine's load.

    python benchmarks/import_times.py STUDY.toml [--repeat 3] [--tree DIR --tree DIR]

STUDY.toml must be a finished study (its store holds every stage), e.g. a copy of
jobs/quickstart.toml after ``distsim launch``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "scipy.optimize", "numba", "ray")


def commands(study: Path, store: Path, out: Path) -> dict[str, list[str]]:
    """Label -> python arguments (after ``-X importtime``)."""
    cli = ["-m", "distsim.cli"]
    return {
        "import distsim.config": ["-c", "import distsim.config"],
        "import distsim.store": ["-c", "import distsim.store"],
        "import distsim.cli": ["-c", "import distsim.cli"],
        "distsim --version": [*cli, "--version"],
        "distsim validate": [*cli, "validate", str(study)],
        "distsim status": [*cli, "status", str(store)],
        "distsim verify": [*cli, "verify", str(store)],
        "distsim query tests": [*cli, "query", "tests", str(store), "--limit", "5"],
        "distsim report": [*cli, "report", str(store), "--out", str(out)],
        "distsim launch (finished)": [*cli, "launch", str(study), "--yes"],
    }


def measure(args: list[str], tree: str | None) -> tuple[float, float, set[str]]:
    """(import seconds, wall seconds, heavy libraries imported) of one run (from `tree`'s
    distsim when given, else the installed one)."""
    env = {**os.environ, **({"PYTHONPATH": tree} if tree else {})}
    start = time.perf_counter()  # cwd: `python -c` and `-m` put the cwd first on sys.path
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                          text=True, check=False, env=env, cwd=tree)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        raise SystemExit(f"{' '.join(args)}: exit {proc.returncode}: {tail[0]}")
    self_us, heavy = 0, set()
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_part, _cumulative, name = line[len("import time:"):].split("|")
        self_us += int(self_part)
        if name.strip() in HEAVY:
            heavy.add(name.strip())
    return self_us / 1e6, wall, heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tree", action="append", default=None,
                        help="a source folder to run distsim from (repeat to compare)")
    args = parser.parse_args()
    trees: list[str | None] = args.tree or [None]
    import tomllib

    raw = tomllib.loads(args.study.read_text())
    store = (args.study.parent / raw["study"]["store"]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        print("| command | tree | import s (median) | wall s (median) | heavy libraries imported |")
        print("|---|---|---|---|---|")
        for label, cmd in commands(args.study, store, Path(tmp) / "report").items():
            runs: dict[str | None, list[tuple[float, float, set[str]]]] = {t: [] for t in trees}
            for _ in range(args.repeat):
                for tree in trees:
                    runs[tree].append(measure(cmd, tree))
            for tree, rs in runs.items():
                imp = statistics.median(r[0] for r in rs)
                wall = statistics.median(r[1] for r in rs)
                heavy = ", ".join(h for h in HEAVY if h in rs[0][2]) or "none"
                print(f"| `{label}` | {tree or 'installed'} | {imp:.2f} | {wall:.2f} | {heavy} |",
                      flush=True)


if __name__ == "__main__":
    main()
