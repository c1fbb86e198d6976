"""The kill-anywhere soak (benchmarks/soak.py) in short: five SIGKILLs of a small study's whole
launch session at random moments of its stages, relaunched, then let finish; its tables equal
an uninterrupted run's, the store verifies, and no temp file, lock or process is left."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_five_kills_anywhere_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--kills", "5",
                          "--seed", "3", "--work", str(tmp_path / "soak")],
                         capture_output=True, text=True, timeout=600)
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    kills = lines[lines.index(next(ln for ln in lines if ln.startswith("| kills"))) + 2]
    # five unless the study finished first (a kill aimed at a stage's first seconds: unlikely)
    assert int(kills.split("|")[1]) >= 3, kills
    assert "soak: nothing lost, duplicated or left behind" in run.stdout
