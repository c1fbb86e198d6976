"""An autoscaling cluster on one machine: Ray's fake multi-node provider (``fake_multinode``,
``RAY_FAKE_CLUSTER=1``) runs cluster.yaml's node types with 1 CPU each. A launch starts on the
head alone, the autoscaler adds workers while trials queue, a worker node is killed mid-zoo and
another mid-features, the launch completes with the tables of a single-node run, and the workers
scale down afterwards.

The fake provider starts each worker node (a raylet and its processes) from the autoscaler's
own process, on this machine; a node is killed by SIGKILLing every process of its node id. Only
the session this test starts is stopped (never `ray stop`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from _procs import kill_session, session_pids
from _study import study_toml
from test_reliability import _assert_same, _run

from distsim.store import Store

pytestmark = [pytest.mark.ray, pytest.mark.multinode, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAKE_HEAD = "ray.head.default"  # the fake provider's name for the head's node type
NODE_ENV = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"  # each fake node's processes carry its id
IDLE_S = 15  # idle_timeout_minutes: 0.25
SECTIONS = {  # 4 tasks x 6 seeds, one model per trial: 24 trials queue on a 1-CPU head
    "data": {"dataset": "synthetic", "num_tasks": 4, "synthetic_samples": 100},
    "arch": [{"kind": "mlp", "widths": [8]}],
    "train": {"seeds_per_task": 6, "seeds_per_trial": 1, "epochs": 20, "batch_size": 16},
    "resources": {"feature_actors": 2, "max_failures": 3},
    "features": {"methods": ["chain-gram", "raw"]},
    "tests": {"permutations": 19, "permanova_permutations": 19},
    "pairs": {"top_k": 3},
}


def fake_config(port: int) -> dict:
    """cluster.yaml for the fake provider: its worker node types (names, min_workers,
    upscaling) with 1 CPU each (no GPU: this machine has none) and at most 2 workers of each,
    its head as the fake head type with 1 CPU, a 15 s idle timeout."""
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = {name: {"resources": {"CPU": 1}, "node_config": {},
                    "min_workers": t.get("min_workers", 0),
                    "max_workers": min(t.get("max_workers", 2), 2)}
             for name, t in cluster["available_node_types"].items()
             if name != cluster["head_node_type"]}
    types[FAKE_HEAD] = {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "distsim-fake", "max_workers": 2, "head_node_type": FAKE_HEAD,
        "available_node_types": types, "upscaling_speed": cluster["upscaling_speed"],
        "idle_timeout_minutes": IDLE_S / 60,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": f"127.0.0.1:{port}"},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands",
                           "worker_start_ray_commands")},
    }


@dataclass
class Cluster:
    address: str  # the head's HOST:PORT
    session: int  # the session of every process of the cluster (head, autoscaler, workers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DISTSIM_FAULTS")}
    env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture
def autoscaling() -> Iterator[Cluster]:
    port = _free_port()
    folder = Path(tempfile.mkdtemp(prefix="dsas-", dir="/tmp"))  # short: socket paths
    (folder / "autoscaler.json").write_text(json.dumps(fake_config(port)))
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=1",
           f"--autoscaling-config={folder / 'autoscaler.json'}", "--include-dashboard=false",
           f"--temp-dir={folder}", f"--dashboard-agent-listen-port={_free_port()}",
           f"--metrics-export-port={_free_port()}", "--disable-usage-stats", "--block"]
    log = folder / "start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=_env(RAY_FAKE_CLUSTER="1",
                                              AUTOSCALER_UPDATE_INTERVAL_S="1"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        address = f"127.0.0.1:{port}"
        # the head runs before its autoscaler reports (`ray status` shows no node until then)
        while active(address) != {FAKE_HEAD: 1}:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(1)
        yield Cluster(address, proc.pid)
    finally:
        survivors = kill_session(proc.pid, timeout=15)
        shutil.rmtree(folder, ignore_errors=True)  # its logs, sockets and spilled objects
        assert not survivors, f"processes of the cluster survived SIGKILL: {survivors}"


def active(address: str) -> dict[str, int]:
    """{node type: count} of the cluster's live nodes (`ray status`)."""
    out = subprocess.run([str(BIN / "ray"), "status", f"--address={address}"],
                         capture_output=True, text=True, env=_env(), timeout=60).stdout
    block = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return {name: int(n) for n, name in re.findall(r"^\s*(\d+) (\S+)\s*$", block, re.M)}


def worker_nodes(session: int) -> dict[str, list[int]]:
    """{fake node id: pids} of the worker nodes running now (the head's id ends in 00000)."""
    nodes: dict[str, list[int]] = {}
    for pid in session_pids(session):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        node = next((e.split(b"=", 1)[1].decode() for e in env
                     if e.startswith(NODE_ENV.encode() + b"=")), None)
        if node is not None and not node.endswith("00000"):
            nodes.setdefault(node, []).append(pid)
    return nodes


def kill_node(session: int, busy: str) -> str:
    """SIGKILL every process of a worker node running a process named `busy` (a trial or a
    feature actor); returns its id."""
    for node, pids in worker_nodes(session).items():
        names = []
        for pid in pids:
            try:
                names.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
            except OSError:
                continue
        if any(busy in n for n in names):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return node
    raise AssertionError(f"no worker node runs {busy!r}: {worker_nodes(session)}")


def test_an_autoscaled_launch_survives_killed_workers_and_scales_down(
        autoscaling: Cluster, ray_session, tmp_path: Path) -> None:
    from distsim.config import parse_study

    path = tmp_path / "study.toml"
    path.write_text(study_toml(study={"name": "autoscale", "store": str(tmp_path / "store")},
                               **SECTIONS))
    assert active(autoscaling.address) == {FAKE_HEAD: 1}  # the head alone (the fixture waits)
    log = tmp_path / "launch.log"
    # every unit sleeps 2 s (trials queue long enough for the autoscaler); one actor per trial
    env = _env(DISTSIM_FAULTS="slow=2", DISTSIM_TUNE_REUSE_ACTORS="0")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "distsim"), "launch", str(path), "--address",
                                 autoscaling.address], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    seen: list[dict[str, int]] = []
    killed: dict[str, str] = {}
    timeline: list[str] = []  # what changed, at which second of the launch
    start = time.monotonic()
    try:
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            seen.append(active(autoscaling.address))
            if len(seen) == 1 or seen[-1] != seen[-2]:
                timeline.append(f"{time.monotonic() - start:.0f} s: {seen[-1]}")
            text = log.read_text()
            workers = sum(n for t, n in seen[-1].items() if t != FAKE_HEAD)
            if "zoo" not in killed and "zoo " in text and workers >= 1:
                try:
                    killed["zoo"] = kill_node(autoscaling.session, "ImplicitFunc")
                    timeline.append(f"{time.monotonic() - start:.0f} s: killed "
                                    f"{killed['zoo'][-5:]} (zoo)")
                except AssertionError:
                    pass  # its first trial is still starting: look again
            if "features" not in killed and "features  0/" in text and "zoo" in killed:
                try:
                    killed["features"] = kill_node(autoscaling.session, "_FeatureWorker")
                    timeline.append(f"{time.monotonic() - start:.0f} s: killed "
                                    f"{killed['features'][-5:]} (features)")
                except AssertionError:
                    pass  # its actors are still starting, or on the head: look again
            time.sleep(1)
        rc = proc.wait(timeout=30)
        ended = time.monotonic()
    finally:
        kill_session(proc.pid)
    text = log.read_text()
    timeline.append(f"{time.monotonic() - start:.0f} s: the launch ended, exit code {rc}")
    failed = [line for line in text.splitlines() if "failed" in line]
    print("\n".join(["timeline:", *timeline, "retried:", *failed]))
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text
    assert max(sum(n for t, n in s.items() if t != FAKE_HEAD) for s in seen) >= 2  # scaled up
    assert set(killed) == {"zoo", "features"}, killed
    assert "zoo       trial " in text and "failed (retrying)" in text  # the killed node's work
    nodes = Store(tmp_path / "store").scan("models").collect()["node"].str.split("/").list.last()
    assert nodes.n_unique() >= 2  # trials ran on the head and on workers

    single = parse_study(study_toml(study={"name": "autoscale", "store":
                                           str(tmp_path / "single")}, **SECTIONS))
    _run(single)  # on this session's one-node Ray
    _assert_same(Store(tmp_path / "store"), Store(tmp_path / "single"))

    deadline = ended + IDLE_S + 60  # idle workers go after the idle timeout
    while active(autoscaling.address) != {FAKE_HEAD: 1}:
        assert time.monotonic() < deadline, f"workers did not scale down: {seen[-1]}"
        time.sleep(2)
    print(f"the workers were gone {time.monotonic() - ended:.0f} s after the launch ended "
          f"({IDLE_S} s idle timeout; the single-node run came between)")
