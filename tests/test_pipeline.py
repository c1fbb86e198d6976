"""The Ray pipeline: stage helpers (no Ray), a tiny study through every stage on the session's
Ray (results checked against the single-process science code), and the quickstart via the CLI."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from _study import study_toml

from distsim.config import parse_study
from distsim.pipeline.pairs import BlockMerges, compute_tile, tile_plan, tile_summary
from distsim.pipeline.progress import Progress
from distsim.pipeline.significance import chunk_sizes, combine
from distsim.store import Store, StoreError

ROOT = Path(__file__).resolve().parents[1]
DISTSIM = str(Path(sys.executable).with_name("distsim"))


def tiny(store: Path, epochs: int, **features: object) -> str:
    """The tiny study: 4 tasks x 4 seeds of an mlp and an rnn, every layer, 9 permutations in
    chunks of 4, top-3 neighbours in tiles of 5 models; `features` override [features] keys."""
    return study_toml(
        study={"name": "tiny", "store": str(store)},
        data={"dataset": "synthetic", "num_tasks": 4, "synthetic_samples": 40},
        arch=[{"name": "mlp", "kind": "mlp", "widths": [8]},
              {"name": "rnn", "kind": "rnn", "hidden": 4}],
        train={"seeds_per_task": 4, "seeds_per_trial": 2, "epochs": epochs, "batch_size": 16},
        features={"methods": ["chain-gram", "raw"], "layers": "all", **features},
        tests={"permutations": 9, "permanova_permutations": 9, "chunk_size": 4},
        pairs={"top_k": 3, "block": 5},
    )


# ----------------------------------------------------------------------------- no Ray


def test_progress_plain_lines_off_a_terminal() -> None:
    out = io.StringIO()
    with Progress("zoo", 3, unit="trial", skipped=2, stream=out, tty=False, line_interval=0) as p:
        for _ in range(3):
            p.update()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("zoo") and "0/3 trial" in lines[0]
    assert "(2 already in store)" in lines[0]
    assert "3/3 trial" in lines[-1] and "trial/s" in lines[-1] and "\r" not in out.getvalue()
    assert sum("3/3" in line for line in lines) == 1  # the end state once, not again at close


def test_progress_bar_on_a_terminal_redraws_in_place() -> None:
    out = io.StringIO()
    p = Progress("pairs", 4, unit="tile", stream=out, tty=True, min_interval=0)
    p.update(4)
    p.close()
    text = out.getvalue()
    assert "\r" in text and "[########################]" in text and text.endswith("\n")
    with pytest.raises(ValueError, match="total"):
        Progress("x", -1, stream=out)


def test_tile_plan_covers_the_upper_triangle_once() -> None:
    assert tile_plan(0, 4) == []
    assert tile_plan(10, 4) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    n, b = 23, 5
    covered = np.zeros((n, n), int)
    for i, j in tile_plan(n, b):
        covered[i * b:(i + 1) * b, j * b:(j + 1) * b] += 1
    assert (np.triu(covered) == np.triu(np.ones((n, n), int))).all()
    with pytest.raises(ValueError):
        tile_plan(5, 0)


def test_tiles_merge_to_the_exact_neighbours_and_pair_sums() -> None:
    from distsim.stats.distances import pairwise_distances, topk_neighbors

    rng = np.random.default_rng(0)
    n, block, k = 23, 5, 4
    X = rng.normal(size=(n, 7)).astype(np.float32)
    tasks = np.repeat(np.arange(5), 5)[:n]
    parts = [compute_tile(X, tasks, i, j, block, k, "euclidean") for i, j in tile_plan(n, block)]
    sums = [p[0] for p in parts]
    want_i, want_d = topk_neighbors(X, k)
    nb = math.ceil(n / block)
    merges = BlockMerges(n, block, k, set(range(nb)) - {2})  # block 2's neighbours are stored
    completed = []
    for t in rng.permutation(len(parts)):  # tiles arrive in any order
        completed += merges.add(*parts[t][1:])
    assert sorted(b for b, *_ in completed) == [0, 1, 3, 4] and not merges.best
    for b, r, got_i, got_d in completed:
        np.testing.assert_array_equal(r, np.arange(b * block, min((b + 1) * block, n)))
        np.testing.assert_array_equal(got_i, want_i[r])
        np.testing.assert_allclose(got_d, want_d[r], rtol=1e-5)
    D = pairwise_distances(X).astype(np.float64)
    iu = np.triu_indices(n, 1)
    same = (tasks[:, None] == tasks[None, :])[iu]
    assert sum(s["intra_count"] for s in sums) == same.sum()
    assert sum(s["inter_count"] for s in sums) == (~same).sum()
    np.testing.assert_allclose(sum(s["intra_sum"] for s in sums), D[iu][same].sum(), rtol=1e-5)
    np.testing.assert_allclose(sum(s["inter_sumsq"] for s in sums), (D[iu][~same] ** 2).sum(),
                               rtol=1e-5)
    diag = tile_summary(np.zeros((3, 3)), np.array([0, 0, 1]), np.array([0, 0, 1]), diagonal=True)
    assert (diag["intra_count"], diag["inter_count"]) == (1, 2)


def test_chunks_and_combined_p_value() -> None:
    assert chunk_sizes(9, 4) == [4, 4, 1] and chunk_sizes(3, 50) == [3]
    with pytest.raises(ValueError):
        chunk_sizes(0, 4)
    head = {"observed": 0.9, "statistic": "accuracy", "chance": 0.25,
            "null": np.array([0.2, 0.95]), "extra": {}}
    row = combine(head, [np.array([0.3]), np.array([0.1, 0.9])], 5)
    assert row["p_value"] == pytest.approx((1 + 2) / (1 + 5))  # 0.95 and the tie 0.9
    assert row["null_mean"] == pytest.approx(np.mean([0.2, 0.95, 0.3, 0.1, 0.9]))
    with pytest.raises(RuntimeError, match="expected 6"):
        combine(head, [], 6)


# ----------------------------------------------------------------------------- on Ray


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file()}


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_tiny_study_every_stage_matches_the_science_code(ray_session, tmp_path: Path) -> None:
    from distsim.pipeline.launch import run_study
    from distsim.stats import htt, htt_null_chunk, p_value, permanova, permanova_null_chunk
    from distsim.stats.distances import pairwise_distances, topk_neighbors
    from distsim.weights.features import weight_features_batch

    study = parse_study(tiny(tmp_path / "store", epochs=3))
    out = io.StringIO()
    result = run_study(study, stream=out)
    assert ray_session.is_initialized(), "run_study must leave the session's Ray running"
    log = out.getvalue()
    assert "already holds" in log and "zoo       16/16 trial" in log
    assert result["stages"]["zoo"]["trials"] == 16 and result["stages"]["zoo"]["failed"] == 0
    store = Store(study.store)

    models = store.scan("models").collect()
    assert models.height == 32 and models["model_id"].n_unique() == 32
    assert models["node"].null_count() == 0 and models["trial_id"].null_count() == 0
    assert set(store.stages()) == {"zoo", "features", "pairs", "tests"}

    # features: the pipeline's rows are weight_features_batch of the stored weights
    fm = store.feature_matrix("rnn", "chain-gram", "gru_ih")
    assert len(fm.model_ids) == 16
    sds = store.read_state_dicts(fm.model_ids)
    arch = study.arch("rnn").with_task_shape((1, 8, 8), 2)
    want = weight_features_batch([sds[m] for m in fm.model_ids], arch, "chain-gram", "gru_ih",
                                 None, 0)
    np.testing.assert_allclose(fm.X, want, rtol=1e-6)

    # neighbors and pairs of one group equal the single-process computation
    fm = store.feature_matrix("mlp", "chain-gram", "out")
    nb = store.scan("neighbors").filter(
        (pl.col("arch") == "mlp") & (pl.col("method") == "chain-gram") & (pl.col("layer") == "out")
    ).sort("model_id", "rank").collect()
    want_i, want_d = topk_neighbors(fm.X, 3)
    pos = {m: i for i, m in enumerate(fm.model_ids)}
    for mid, group in nb.group_by("model_id", maintain_order=True):
        r = pos[mid[0]]
        assert group["neighbor_id"].to_list() == [fm.model_ids[j] for j in want_i[r]]
        np.testing.assert_allclose(group["distance"].to_numpy(), want_d[r], rtol=1e-5)
    pairs = store.scan("pairs").filter(
        (pl.col("arch") == "mlp") & (pl.col("method") == "chain-gram") & (pl.col("layer") == "out")
    ).collect()
    assert pairs.height == len(tile_plan(16, 5))
    D = pairwise_distances(fm.X).astype(np.float64)
    iu = np.triu_indices(16, 1)
    same = (fm.tasks[:, None] == fm.tasks[None, :])[iu]
    assert pairs["intra_count"].sum() == same.sum() == 4 * 6
    np.testing.assert_allclose(pairs["intra_sum"].sum(), D[iu][same].sum(), rtol=1e-5)
    np.testing.assert_allclose(pairs["inter_sum"].sum(), D[iu][~same].sum(), rtol=1e-5)

    # tests: chunked nulls (4 + 4 + 1) recombine to what the stats functions give in one process
    tests = store.scan("tests").collect()
    assert tests.height == (2 + 2) * 2 * 4  # (mlp fc1, out + rnn gru_ih, out) x 2 methods x 4 tests
    assert (tests["p_value"] >= 1 / 10 - 1e-12).all() and (tests["p_value"] <= 1).all()
    # seconds: the compute time of the test's chunks, summed (each ran, so some time was spent)
    assert tests["seconds"].is_finite().all() and (tests["seconds"] > 0).all()
    row = tests.filter((pl.col("arch") == "mlp") & (pl.col("method") == "chain-gram")
                       & (pl.col("layer") == "out") & (pl.col("protocol") == "closed-set")
                       ).row(0, named=True)
    kw = {"options": study.tests.htt_options()}
    head = htt(fm.X, fm.tasks, "closed-set", permutations=4, seed=0, **kw)
    chunks = [htt_null_chunk(fm.X, fm.tasks, "closed-set", permutations=b, seed=(0, c),
                             split_seed=0, **kw) for c, b in ((1, 4), (2, 1))]
    null = np.concatenate([head.null] + chunks)
    assert row["observed"] == pytest.approx(head.statistic) and row["chance"] == pytest.approx(0.25)
    assert row["p_value"] == pytest.approx(p_value(head.statistic, null))
    assert row["null_mean"] == pytest.approx(null.mean()) and row["permutations"] == 9
    row = tests.filter((pl.col("arch") == "mlp") & (pl.col("method") == "chain-gram")
                       & (pl.col("layer") == "out") & (pl.col("protocol") == "permanova")
                       ).row(0, named=True)
    D = pairwise_distances(fm.X)
    first = permanova(D, fm.tasks, permutations=4, seed=0)
    null = np.concatenate([first.null, permanova_null_chunk(D, fm.tasks, 4, (0, 1)),
                           permanova_null_chunk(D, fm.tasks, 1, (0, 2))])
    assert row["observed"] == pytest.approx(first.statistic)
    assert row["p_value"] == pytest.approx(p_value(first.statistic, null))
    assert json.loads(row["extra"])["route"] == "features"  # Euclidean: no N x N matrix
    assert re.search(r"^mlp: \d+ models$", log, re.M)  # the summary's grid for the mlp
    assert re.search(r"^out +\d\.\d\d/\d\.\d\d", log, re.M)  # its 'out' row: accuracy/chance

    # a second launch of the finished study runs nothing and changes nothing
    before = _files(store.root)
    t0 = time.monotonic()
    again = run_study(study, stream=io.StringIO())
    assert again["stages"] == {} and again["summary"].height == tests.height
    assert _files(store.root) == before
    assert time.monotonic() - t0 < 60  # generous: "seconds", not a re-run (no timing claim)

    # a changed study is refused unless fresh
    changed = parse_study(tiny(tmp_path / "store", epochs=4))
    with pytest.raises(StoreError, match="train.epochs"):
        run_study(changed, stages=("zoo",), stream=io.StringIO())
    assert _files(store.root) == before


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_gram_aligned_and_cka_in_the_pipeline(ray_session, tmp_path: Path) -> None:
    """The features stage makes each arch's aligned template once (stored, then reused), gives
    cka the study's probe, and writes what weight_features_batch gives for them."""
    from distsim.pipeline.features import read_template, study_probe
    from distsim.pipeline.launch import run_study
    from distsim.store.verify import verify_store
    from distsim.weights.features import weight_features_batch

    study = parse_study(tiny(tmp_path / "store", epochs=2, methods=["gram", "aligned", "cka"],
                             template_models=5, probe_size=12))
    assert study.features.methods == ("gram", "aligned", "cka")
    out = io.StringIO()
    run_study(study, stages=("zoo", "features"), stream=out)
    assert "mlp: aligned template from 5 models" in out.getvalue()
    store = Store(study.store)
    templates = store.scan("templates").collect()
    assert sorted(templates["arch"].unique()) == ["mlp", "rnn"]
    assert {len(m.split(",")) for m in templates["models"]} == {5}
    for arch_name, layer in (("mlp", "fc1"), ("rnn", "out")):
        arch = study.arch(arch_name).with_task_shape((1, 8, 8), 2)
        for method, extra in (("aligned", {"template": read_template(store, arch_name)}),
                              ("cka", {"probe": study_probe(study.data, 12, 0)})):
            fm = store.feature_matrix(arch_name, method, layer)
            sds = store.read_state_dicts(fm.model_ids)
            want = weight_features_batch([sds[m] for m in fm.model_ids], arch, method, layer,
                                         **extra)
            np.testing.assert_allclose(fm.X, want, rtol=1e-6, atol=1e-7)
    # the template is kept: a relaunch after losing a features shard reuses it
    before = templates.sort("arch", "tensor")
    shard = store.shard_files("features", {"arch": "mlp", "method": "aligned"})[0]
    shard.unlink()
    run_study(study, stages=("features",), stream=io.StringIO())
    assert store.scan("templates").collect().sort("arch", "tensor").equals(before)
    assert shard.is_file()
    assert verify_store(store) == []  # the templates table keeps the table contract


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_shared_init_study_tests_within_init_seed_strata(ray_session, tmp_path: Path) -> None:
    """train.shared_init: the zoo initializes model i of every task alike, and the tests stage
    runs the HTT protocols within init-seed strata (equal to htt(..., strata=model index)) and
    no PERMANOVA / PERMDISP, whose permutations are not restricted to strata."""
    from distsim.pipeline.launch import run_study
    from distsim.stats import htt, htt_null_chunk, p_value

    text = tiny(tmp_path / "store", epochs=1, methods=["raw"], layers="last")
    study = parse_study(text.replace("[train]\n", "[train]\nshared_init = true\n", 1))
    assert study.train.shared_init
    run_study(study, stream=io.StringIO())
    store = Store(study.store)
    tests = store.scan("tests").collect()
    assert sorted(set(tests["protocol"])) == ["closed-set", "open-set"]
    fm = store.feature_matrix("mlp", "raw", "out")
    strata = study.model_index(fm.seeds, fm.tasks)
    assert sorted(set(strata.tolist())) == [0, 1, 2, 3]
    row = tests.filter((pl.col("arch") == "mlp") & (pl.col("protocol") == "closed-set")
                       ).row(0, named=True)
    kw = {"options": study.tests.htt_options(), "strata": strata}
    head = htt(fm.X, fm.tasks, "closed-set", permutations=4, seed=0, **kw)
    chunks = [htt_null_chunk(fm.X, fm.tasks, "closed-set", permutations=b, seed=(0, c),
                             split_seed=0, **kw) for c, b in ((1, 4), (2, 1))]
    assert row["p_value"] == pytest.approx(p_value(head.statistic,
                                                   np.concatenate([head.null, *chunks])))
    assert json.loads(row["extra"])["strata"] == 4


@pytest.mark.ray
def test_missing_upstream_stage_is_a_one_line_error(ray_session, tmp_path: Path) -> None:
    from distsim.errors import LaunchError
    from distsim.pipeline.launch import run_study

    study = parse_study(tiny(tmp_path / "store", epochs=1))
    with pytest.raises(LaunchError, match="run the zoo stage first"):
        run_study(study, stages=("features",), stream=io.StringIO())
    with pytest.raises(LaunchError, match="'train' is not a stage"):
        run_study(study, stages=("train",), stream=io.StringIO())


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_quickstart_via_cli(tmp_path: Path) -> None:
    """`distsim launch jobs/quickstart.toml`: chain-gram far above chance (p at its floor), raw
    weaker."""
    text = (ROOT / "jobs" / "quickstart.toml").read_text()
    lines = [f'store = "{tmp_path / "store"}"' if line.startswith("store =") else line
             for line in text.splitlines()]
    (tmp_path / "quickstart.toml").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    t0 = time.monotonic()
    proc = subprocess.run([DISTSIM, "launch", str(tmp_path / "quickstart.toml")], env=env,
                          capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    for arch in ("mlp", "cnn", "rnn"):  # one grid per arch: layer x method, then the legend
        assert re.search(rf"^{arch}: 120 models$", proc.stderr, re.M)
    assert re.search(r"^layer +chain-gram +gram +raw +aligned +cka$", proc.stderr, re.M)
    assert re.search(r"^q +Benjamini-Hochberg over all 160 tests", proc.stderr, re.M)
    assert re.search(r"^every row, with p and q .*: distsim query tests ", proc.stderr, re.M)
    tests = Store(tmp_path / "store").scan("tests").collect()
    study = parse_study(text, base_dir=ROOT / "jobs")
    floor = 1 / (1 + study.tests.permutations)
    for arch in ("mlp", "cnn", "rnn"):
        last = study.feature_layers(arch)[-1]
        mine = tests.filter((pl.col("arch") == arch) & (pl.col("layer") == last))
        closed = mine.filter(pl.col("protocol") == "closed-set")
        chain = closed.filter(pl.col("method") == "chain-gram").row(0, named=True)
        raw = closed.filter(pl.col("method") == "raw").row(0, named=True)
        assert chain["p_value"] == pytest.approx(floor), (arch, chain)
        assert chain["observed"] >= chain["chance"] + 0.5, (arch, chain)
        assert raw["observed"] < chain["observed"] - 0.3, (arch, raw, chain)
    print(f"quickstart wall time: {wall:.1f} s")
    _assert_tests_equal(_torch_rerun(tmp_path, lines, env), tmp_path / "store")


def _torch_rerun(tmp_path: Path, lines: list[str], env: dict[str, str]) -> Path:
    """The quickstart's pairs and tests stages again with pairs.backend and tests.backend
    "torch" (torch's CPU device here), on a copy of its store without their tables."""
    store, twin = tmp_path / "store", tmp_path / "store-torch"
    dropped = {store: {"pairs", "neighbors", "tests"},
               store / "_stages": {"pairs.json", "tests.json"}}
    shutil.copytree(store, twin, ignore=lambda folder, names: [
        name for name in names if name in dropped.get(Path(folder), ())])
    text = "\n".join(f'store = "{twin}"' if line.startswith("store =") else line
                     for line in lines).replace("[tests]\n", '[tests]\nbackend = "torch"\n')
    text = text.replace("[pairs]\n", '[pairs]\nbackend = "torch"\n')
    assert text.count('backend = "torch"') == 2
    (tmp_path / "quickstart-torch.toml").write_text(text + "\n")
    proc = subprocess.run([DISTSIM, "launch", str(tmp_path / "quickstart-torch.toml"),
                           "--stages", "pairs,tests"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return twin


def _assert_tests_equal(got_store: Path, want_store: Path) -> None:
    """Two tests tables equal: every key, count and label alike, every statistic (the nulls
    and the numbers in extra too) to 1e-6 relative, every p-value exactly (the run's seconds
    aside)."""
    keys = ["arch", "method", "layer", "protocol", "factor", "epoch"]
    got, want = (Store(s).scan("tests").sort(keys).collect() for s in (got_store, want_store))
    assert got.height == want.height > 0 and got.columns == want.columns

    def close(g: object, w: object, what: str) -> None:
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                   rtol=1e-6, atol=1e-12, err_msg=what)

    for col in set(want.columns) - {"seconds"}:
        if col == "extra":
            for g, w in zip(got[col].to_list(), want[col].to_list(), strict=True):
                g, w = json.loads(g), json.loads(w)
                assert g.keys() == w.keys()
                for key, value in w.items():
                    if isinstance(value, float):
                        close(g[key], value, f"extra.{key}")
                    else:
                        assert g[key] == value, f"extra.{key}"
        elif want[col].dtype == pl.List(pl.Float64):
            for g, w in zip(got[col].to_list(), want[col].to_list(), strict=True):
                close(g, w, col)
        elif want[col].dtype.is_float() and col != "p_value":
            close(got[col].to_numpy(), want[col].to_numpy(), col)
        else:
            assert got[col].equals(want[col]), col


def test_joining_an_address_nobody_serves_fails_fast() -> None:
    import socket

    from distsim.errors import LaunchError
    from distsim.pipeline.launch import check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(LaunchError, match="nothing answers there"):
            check_reachable(f"127.0.0.1:{port}")
    check_reachable("auto")  # left to ray.init


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_failed_trials_are_retried_recorded_and_trained_by_the_next_launch(
    ray_session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distsim.errors import IncompleteError
    from distsim.pipeline import faults
    from distsim.pipeline.launch import run_study

    study = parse_study(study_toml(
        study={"name": "failing", "store": str(tmp_path / "store")},
        data={"num_tasks": 2},
        arch=[{"kind": "mlp", "widths": [4]}],
        train={"seeds_per_task": 2, "seeds_per_trial": 2, "epochs": 1},
        resources={"max_failures": 1},
    ))
    # a seed that makes exactly the trial of task 1 fail, on its first 2 attempts
    seed = next(s for s in range(100) if [faults.chosen("trial", f"mlp-t{t}-p0", {
        "trial": 0.5, "seed": s}) for t in (0, 1)] == [False, True])
    monkeypatch.setenv(faults.ENV, f"trial=0.5,seed={seed},times=2")
    out = io.StringIO()
    with pytest.raises(IncompleteError, match=r"zoo: 1/2 packs \(1 failed\).*injected trial fault"):
        run_study(study, stages=("zoo",), stream=out)
    assert "1 trial(s) failed after 1 retries" in out.getvalue()
    store = Store(study.store)
    models = store.scan("models").sort("model_id").collect()
    assert models["status"].to_list() == ["ok", "ok", "failed", "failed"]
    assert models["error"][2].startswith("InjectedFault: injected trial fault in mlp-t1-p0")
    assert models["test_acc"][2:].is_nan().all()
    assert "zoo" not in store.stages()

    result = run_study(study, stages=("zoo",), stream=io.StringIO())  # its 2 failures are spent
    assert result["stages"]["zoo"]["trials"] == 1 and result["stages"]["zoo"]["failed"] == 0
    models = store.scan("models").collect()
    assert models.height == 4 and (models["status"] == "ok").all()
    assert models["error"].is_null().all()
    assert "zoo" in store.stages()
