"""Faults and bad requests against one small study, on the session's Ray: injected failures
of trials, feature actors, pair tiles and test chunks (``DISTSIM_FAULTS``) are retried or
recorded and resumed, and the final tables equal an unfaulted run's; a failed pack later
retrained makes every downstream output stale and recomputed; ``--partial`` runs on what is
stored and says so; the cluster checks refuse before anything is written; ``--fresh`` asks
first and deletes nothing when refused; a systematic trial failure stops the zoo at once."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from _study import study_toml

from distsim.config import parse_study
from distsim.errors import IncompleteError, LaunchError
from distsim.pipeline import faults
from distsim.store import Store

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

TASKS, SEEDS = 4, 4  # 16 packs of one model
SECTIONS: dict[str, Any] = {
    "data": {"dataset": "synthetic", "num_tasks": TASKS, "synthetic_samples": 60},
    "arch": [{"kind": "mlp", "widths": [8]}],
    "train": {"seeds_per_task": SEEDS, "seeds_per_trial": 1, "epochs": 2, "batch_size": 16},
    "resources": {"max_failures": 2},
    "tests": {"permutations": 9, "permanova_permutations": 9, "chunk_size": 5},
    "pairs": {"top_k": 3, "block": 4},
}
# What must not depend on how a run went (trial ids, times, nodes and lineage aside).
COMPARE = {
    "models": ["model_id", "task", "pack", "seed", "status", "train_acc", "test_acc",
               "train_loss", "test_loss", "epochs"],
    "features": ["model_id", "method", "layer", "vector"],
    "pairs": ["method", "layer", "block_i", "block_j", "intra_count", "intra_sum",
              "inter_count", "inter_sum"],
    "neighbors": ["model_id", "method", "layer", "rank", "neighbor_id", "distance"],
    "tests": ["method", "layer", "protocol", "observed", "chance", "null_mean", "null_sd",
              "p_value", "n_models", "n_tasks"],
}


def _study(root: Path, name: str):
    return parse_study(study_toml(study={"name": name, "store": str(root / name)}, **SECTIONS))


def _run(study, **kwargs):
    from distsim.pipeline.launch import run_study

    out = io.StringIO()
    try:
        return run_study(study, stream=out, **kwargs), out.getvalue()
    except BaseException as exc:
        exc.add_note(out.getvalue()[-3000:])
        raise


def _tables(store: Store) -> dict[str, pl.DataFrame]:
    keys = {"models": ["model_id"], "features": ["model_id", "method", "layer"],
            "pairs": ["method", "layer", "block_i", "block_j"],
            "neighbors": ["model_id", "method", "layer", "rank"],
            "tests": ["method", "layer", "protocol"]}
    return {t: store.scan(t).select(cols).sort(keys[t]).collect() for t, cols in COMPARE.items()}


def _assert_same(a: Store, b: Store) -> None:
    for table, (x, y) in {t: (_tables(a)[t], _tables(b)[t]) for t in COMPARE}.items():
        assert x.height == y.height, table
        for col in x.columns:
            if x[col].dtype.is_float():
                np.testing.assert_allclose(x[col].to_numpy(), y[col].to_numpy(), rtol=1e-6,
                                           err_msg=f"{table}.{col}")
            elif x[col].dtype == pl.List(pl.Float32):
                for u, v in zip(x[col].to_list(), y[col].to_list(), strict=True):
                    np.testing.assert_allclose(u, v, rtol=1e-6, err_msg=f"{table}.{col}")
            else:
                assert x[col].equals(y[col]), f"{table}.{col}"


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory) -> Store:
    """The study run once without faults."""
    study = _study(tmp_path_factory.mktemp("reliability"), "reference")
    _run(study)
    return Store(study.store)


def _seed(kind: str, rate: float, units: list[str], avoid: list[str]) -> int:
    """A fault seed that chooses some of `units` and none of `avoid`."""
    for s in range(1000):
        plan = {kind: rate, "seed": s}
        if any(faults.chosen(kind, u, plan) for u in units) and not any(
                faults.chosen(kind, u, plan) for u in avoid):
            return s
    raise AssertionError("no seed")


def test_ten_percent_faults_everywhere_are_retried_to_the_same_tables(
    reference: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first trials scheduled succeed (else 3 failures before any success read as systematic)
    packs = [f"mlp-t{t}-p{p}" for t in range(TASKS) for p in range(SEEDS)]
    seed = _seed("trial", 0.1, packs[4:], packs[:4])
    monkeypatch.setenv(faults.ENV, f"trial=0.1,feature=0.1,tile=0.1,test=0.1,seed={seed}")
    study = _study(tmp_path, "faulty")
    result, log = _run(study)
    injected = sorted(p.name.split("-")[0] for p in (Path(study.store) / "_faults").iterdir())
    counts = {k: injected.count(k) for k in faults.KINDS}
    print(f"injected faults (seed {seed}): {counts}; stages: "
          + ", ".join(f"{s} {i.get('failed', 0)} failed" for s, i in result["stages"].items()))
    assert all(counts.values()), counts  # every kind failed at least once, and was retried
    assert "trial mlp-t" in log and "InjectedFault" in log
    _assert_same(Store(study.store), reference)


def test_a_failed_pack_stops_the_launch_partial_runs_on_the_rest_then_retrain_refreshes(
    reference: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distsim.pipeline.launch import stage_states
    from distsim.store.verify import verify_store

    packs = [f"mlp-t{t}-p{p}" for t in range(TASKS) for p in range(SEEDS)]
    seed = next(s for s in range(1000) if [faults.chosen("trial", u, {"trial": 0.05, "seed": s})
                                           for u in packs].count(True) == 1
                and not any(faults.chosen("trial", u, {"trial": 0.05, "seed": s})
                            for u in packs[:4]))
    failing = next(u for u in packs if faults.chosen("trial", u, {"trial": 0.05, "seed": seed}))
    # 6 failures: the 3 attempts (max_failures = 2) of this launch and of the next
    monkeypatch.setenv(faults.ENV, f"trial=0.05,seed={seed},times=6")
    study = _study(tmp_path, "partial")
    store = Store(study.store)
    with pytest.raises(IncompleteError, match=r"features: not run, its upstream is incomplete "
                                              r"\(zoo 15/16 packs \(1 failed\)\); first cause: "
                                              r"InjectedFault"):
        _run(study)
    assert store.scan("models").filter(pl.col("status") == "failed").collect().height == 1
    assert set(store.stages()) == set() and not store.shard_files("features")

    result, log = _run(study, partial=True)
    assert "PARTIAL: features runs on an incomplete upstream (zoo 15/16 packs (1 failed))" in log
    assert all(result["stages"][s]["partial"] for s in ("features", "pairs", "tests"))
    tests = store.scan("tests").collect()
    assert (tests["n_models"] == TASKS * SEEDS - 1).all()
    states = {name: state for name, state, _ in stage_states(study, store)}
    assert states == {"zoo": "partial", "features": "partial", "pairs": "partial",
                      "tests": "partial"}
    assert verify_store(store) == []

    monkeypatch.delenv(faults.ENV)
    result, log = _run(study)
    assert result["stages"]["zoo"]["trials"] == 1, failing
    assert result["stages"]["features"]["packs"] == 1
    assert result["stages"]["pairs"]["tiles"] > 0 and result["stages"]["tests"]["tests"] == 16
    assert {name: state for name, state, _ in stage_states(study, store)} == dict.fromkeys(
        ("zoo", "features", "pairs", "tests"), "complete")
    _assert_same(store, reference)  # the stale partial outputs were all recomputed


def test_a_systematic_trial_failure_stops_the_zoo_at_once(
    ray_session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(faults.ENV, "trial=1,times=9")
    study = _study(tmp_path, "systematic")
    with pytest.raises(LaunchError, match=r"zoo: the first 3 trial attempts failed with the same "
                                          r"error.*InjectedFault: injected trial fault"):
        _run(study)
    models = Store(study.store).scan("models").collect()
    assert models.height == 0  # stopped, not recorded as failed: nothing to retrain wrongly


@pytest.mark.parametrize(("resources", "train", "message"), [
    ({"cpus_per_trial": 64}, {}, r"resources.cpus_per_trial = 64 fits on no node"),
    ({"gpus_per_trial": 1}, {"device": "cuda"}, r"train.device = 'cuda' but the Ray cluster "
                                               r"has no GPU"),
])
def test_the_cluster_checks_refuse_before_anything_is_written(
    ray_session, tmp_path: Path, resources: dict, train: dict, message: str
) -> None:
    sections = {**SECTIONS, "resources": resources, "train": {**SECTIONS["train"], **train}}
    study = parse_study(study_toml(study={"name": "big", "store": str(tmp_path / "s")},
                                   **sections))
    with pytest.raises(LaunchError, match=message):
        _run(study)
    assert not (tmp_path / "s").exists()  # not even the folder: the lock's is removed


def test_fresh_asks_and_deletes_nothing_when_refused(reference: Store) -> None:
    study = _study(reference.root.parent, "reference")
    before = sorted((p, p.stat().st_mtime_ns) for p in reference.root.rglob("*"))
    questions: list[str] = []

    def no(question: str) -> bool:
        questions.append(question)
        return False

    with pytest.raises(LaunchError, match="--fresh: not confirmed; nothing was deleted"):
        _run(study, fresh=True, confirm=no)
    assert questions and questions[0].startswith("--fresh deletes study 'reference' in ")
    assert sorted((p, p.stat().st_mtime_ns) for p in reference.root.rglob("*")) == before
