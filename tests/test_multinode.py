"""Multi-node proof on one machine: a head and a second Ray node (`ray start`, 1 CPU each, own
temp dirs and ports), a tiny study launched with `--address`: trials run on both nodes and the
results equal a single-node run of the same study. Only the processes started here are stopped
(never `ray stop`, which would kill every Ray on the machine)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from _procs import kill_session

from distsim.config import parse_study
from distsim.store import Store

pytestmark = [pytest.mark.ray, pytest.mark.multinode, pytest.mark.slow]

BIN = Path(sys.executable).parent
# The study's sections but [study] (name and store), for the `study_toml` fixture.
SECTIONS = {
    "data": {"dataset": "synthetic", "num_tasks": 2, "synthetic_samples": 100},
    "arch": [{"kind": "mlp", "widths": [8]}],
    "train": {"seeds_per_task": 4, "seeds_per_trial": 2, "epochs": 60, "batch_size": 16},
    "features": {"methods": ["chain-gram", "raw"]},
    "pairs": {"top_k": 3},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # `ray start --head` turns token auth on when a token exists; a node or driver that joins by
    # address must be told to use it too.
    env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    return env


@dataclass
class Cluster:
    address: str  # the head's HOST:PORT
    worker: int  # the session id of the worker node's processes (to kill the node)


@pytest.fixture()
def two_nodes():
    """A 2-node Ray cluster on this machine (head + one worker node, 1 CPU each)."""
    port = _free_port()
    dirs = [tempfile.mkdtemp(prefix="dsmn-", dir="/tmp") for _ in range(2)]  # short: socket paths
    sessions: list[int] = []
    common = ["--num-cpus=1", "--disable-usage-stats", "--block"]
    head = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false",
            f"--temp-dir={dirs[0]}", f"--dashboard-agent-listen-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", *common]
    worker = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", f"--temp-dir={dirs[1]}",
              f"--dashboard-agent-listen-port={_free_port()}",
              f"--metrics-export-port={_free_port()}", *common]
    logs = [open(Path(d) / "start.log", "w") for d in dirs]
    try:
        for cmd, log in zip((head, worker), logs, strict=True):
            proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            sessions.append(proc.pid)
            _wait_for_nodes(port, len(sessions), proc, log.name)
        yield Cluster(f"127.0.0.1:{port}", sessions[1])
    finally:
        for sid in reversed(sessions):
            survivors = kill_session(sid, timeout=10)
            assert not survivors, f"processes of session {sid} survived SIGKILL: {survivors}"
        for log in logs:
            log.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def _wait_for_nodes(port: int, n: int, proc: subprocess.Popen, log: str) -> None:
    """Wait (up to 90 s) until `ray start --block` logs that its node runs."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, Path(log).read_text()[-2000:]
        if "Ray runtime started" in Path(log).read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"ray start did not bring up node {n}: {Path(log).read_text()[-2000:]}")


def test_two_nodes_share_the_zoo_and_match_a_single_node_run(
    two_nodes, ray_session, tmp_path: Path, study_toml
) -> None:
    from distsim.pipeline.launch import run_study

    def study_text(store: Path) -> str:
        return study_toml(study={"name": "multinode", "store": str(store)}, **SECTIONS)

    multi, single = tmp_path / "multi", tmp_path / "single"
    (tmp_path / "study.toml").write_text(study_text(multi))
    # One actor per trial: the first two trials start together, one on each 1-CPU node (with
    # actor reuse a fast node may take every trial before the other node's worker is up).
    env = {**_env(), "DISTSIM_TUNE_REUSE_ACTORS": "0"}
    proc = subprocess.run([str(BIN / "distsim"), "launch", str(tmp_path / "study.toml"),
                           "--address", two_nodes.address, "--stages", "zoo,features"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 node(s)" in proc.stderr
    models = Store(multi).scan("models").sort("model_id").collect()
    assert models.height == 8 and (models["status"] == "ok").all()
    nodes = set(models["node"].str.split("/").list.last().to_list())
    assert len(nodes) == 2, f"all trials ran on one node: {nodes}"

    # the same study on one node (this session's Ray) gives the same weights, metrics, features
    study = parse_study(study_text(single))
    run_study(study, stages=("zoo", "features"), stream=io.StringIO())
    ref = Store(single).scan("models").sort("model_id").collect()
    cols = ["model_id", "task", "pack", "seed", "status", "train_acc", "test_acc", "train_loss",
            "test_loss", "epochs"]
    assert models.select(cols).equals(ref.select(cols))
    w_multi, w_single = Store(multi).read_state_dicts(), Store(single).read_state_dicts()
    assert w_multi.keys() == w_single.keys()
    for mid, sd in w_single.items():
        for name, tensor in sd.items():
            np.testing.assert_array_equal(w_multi[mid][name].numpy(), tensor.numpy(),
                                          err_msg=f"{mid} {name}")
    for method in ("chain-gram", "raw"):
        for layer in study.feature_layers("mlp"):
            a = Store(multi).feature_matrix("mlp", method, layer)
            b = Store(single).feature_matrix("mlp", method, layer)
            assert a.model_ids == b.model_ids
            np.testing.assert_array_equal(a.X, b.X)
    assert Store(single).scan("models").select(pl.col("node").n_unique()).collect().item() == 1


def test_a_worker_node_killed_mid_zoo_loses_nothing_and_duplicates_nothing(
    two_nodes, tmp_path: Path, study_toml
) -> None:
    """SIGKILL every process of the worker node while the zoo runs on both nodes: its trials
    fail and are retried on the head (or a relaunch trains them); every model once."""
    sections = {**SECTIONS, "train": {**SECTIONS["train"], "seeds_per_task": 8,
                                      "seeds_per_trial": 1, "epochs": 150}}
    (tmp_path / "study.toml").write_text(
        study_toml(study={"name": "nodekill", "store": str(tmp_path / "store")}, **sections))
    env = {**_env(), "DISTSIM_TUNE_REUSE_ACTORS": "0"}
    cmd = [str(BIN / "distsim"), "launch", str(tmp_path / "study.toml"), "--address",
           two_nodes.address, "--stages", "zoo,features"]
    log = tmp_path / "first.log"
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    models = tmp_path / "store" / "models" / "arch=mlp"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if models.is_dir() and len(list(models.glob("*.parquet"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()[-3000:]
        done_before = len(list(models.glob("*.parquet")))
        assert not kill_session(two_nodes.worker, timeout=10), "the worker node survived"
        rc = proc.wait(timeout=400)
    finally:
        kill_session(proc.pid)
    first = log.read_text()
    print(f"worker node killed with {done_before} of 16 packs stored; the launch exited {rc}")
    assert "Traceback" not in first, first[-3000:]
    if rc != 0:  # trials that failed after their retries: recorded, and the relaunch trains them
        assert rc == 1, first[-3000:]
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert again.returncode == 0, again.stderr[-3000:]
    rows = Store(tmp_path / "store").scan("models").collect()
    assert rows.height == 16 and rows["model_id"].n_unique() == 16
    assert (rows["status"] == "ok").all()
    feats = Store(tmp_path / "store").scan("features").collect()
    assert feats.select("model_id", "method", "layer").is_duplicated().sum() == 0
