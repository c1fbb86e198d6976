"""Preflight checks: offline (data, archs against the data, the store folder; nothing written)
and against a Ray cluster (fake node lists, the project's cluster.yaml as an autoscaler config,
and once the session's real local Ray)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _study import study_toml

from distsim.config import parse_study
from distsim.errors import ConfigError, LaunchError, StoreError
from distsim.pipeline import preflight
from distsim.pipeline.preflight import bootstrap_node_types, check_cluster, check_offline
from distsim.store import Store

ROOT = Path(__file__).resolve().parents[1]


def make(tmp_path: Path, **sections):
    """A small study (synthetic data unless told) whose store is tmp_path/store; closed-set
    only, as open-set needs 4 tasks."""
    study = {"name": "test", "store": str(tmp_path / "store"), **sections.pop("study", {})}
    sections.setdefault("tests", {"protocols": ["closed-set"]})
    return parse_study(study_toml(study=study, **sections), base_dir=tmp_path)


def node(cpus: float, gpus: float = 0, alive: bool = True, head: bool = False) -> dict:
    resources = {"CPU": float(cpus), "memory": 1e9}
    if gpus:
        resources["GPU"] = float(gpus)
    if head:
        resources[preflight.HEAD_RESOURCE] = 1.0
    return {"Alive": alive, "NodeID": os.urandom(8).hex(), "NodeManagerAddress": "10.0.0.1",
            "Resources": resources}


def npz(tmp_path: Path, name: str = "data.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def images(n_per_class: int = 10, classes: int = 4, side: int = 8) -> dict:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), n_per_class)
    return {"X": rng.integers(0, 256, size=(len(y), side, side), dtype=np.uint8), "y": y}


# ----------------------------------------------------------------------------- offline: data


def test_new_store_and_data_notes_and_nothing_written(tmp_path: Path) -> None:
    study = make(tmp_path)
    notes = check_offline(study)
    assert notes == [
        "data: 2 synthetic tasks of 2 classes, samples 1x8x8, 150 train / 50 test each",
        f"store: new folder {tmp_path / 'store'} (created on launch)",
    ]
    assert not (tmp_path / "store").exists()


def test_more_tasks_than_digit_pairs(tmp_path: Path) -> None:
    study = make(tmp_path, data={"dataset": "digits", "num_tasks": 1000})
    with pytest.raises(ConfigError) as err:
        check_offline(study)
    assert err.value.key == "data.num_tasks"
    assert str(err.value) == ("data.num_tasks: 1000 is more than the 45 random class pairs of "
                              "digits (10 classes); set it to at most 45")


def test_more_tasks_than_consecutive_pairs_names_random_pairing(tmp_path: Path) -> None:
    path = npz(tmp_path, **images(classes=4))
    study = make(tmp_path, data={"dataset": "npz", "path": path, "num_tasks": 3,
                                 "pairing": "consecutive"})
    with pytest.raises(ConfigError, match=r"^data.num_tasks: 3 is more than the 2 consecutive "
                       r".*set it to at most 2 \(pairing = 'random' allows 6\)$"):
        check_offline(study)


def test_missing_npz(tmp_path: Path) -> None:
    study = make(tmp_path, data={"dataset": "npz", "path": "nowhere.npz", "num_tasks": 1})
    with pytest.raises(ConfigError) as err:
        check_offline(study)
    assert err.value.key == "data.path"
    assert str(err.value) == f"data.path: no such file {str(tmp_path / 'nowhere.npz')!r}"


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"images": np.zeros((8, 4, 4)), "y": np.arange(8) % 2}, "must hold arrays 'X' and 'y'"),
        ({"X": np.zeros((8, 4, 4)), "y": np.zeros(8)}, "y must be a 1-D integer array"),
        ({"X": np.zeros((8, 4, 4)), "y": np.arange(6) % 2}, "X has 8 samples but y has 6"),
        ({"X": np.zeros((8, 1, 1, 4, 4)), "y": np.arange(8) % 2}, "X must be (N, D), (N, H, W)"),
        ({"X": np.zeros((3, 4)), "y": np.array([0, 0, 1])}, "class 1 has 1 samples"),
    ],
    ids=["keys", "y-float", "lengths", "x-5d", "one-sample-class"],
)
def test_malformed_npz(tmp_path: Path, arrays: dict, problem: str) -> None:
    study = make(tmp_path, data={"dataset": "npz", "path": npz(tmp_path, **arrays),
                                 "num_tasks": 1})
    with pytest.raises(ConfigError, match=r"^data\.path: ") as err:
        check_offline(study)
    assert err.value.key == "data.path" and problem in str(err.value)


def test_not_an_npz_file(tmp_path: Path) -> None:
    (tmp_path / "data.npz").write_text("not a zip")
    study = make(tmp_path, data={"dataset": "npz", "path": "data.npz", "num_tasks": 1})
    with pytest.raises(ConfigError, match=r"^data\.path: cannot read .* as \.npz"):
        check_offline(study)


def test_arch_checked_against_the_npz_samples(tmp_path: Path) -> None:
    """The loader cannot size archs for an npz (the file is read at launch): preflight can."""
    path = npz(tmp_path, **images(side=4))
    study = make(tmp_path, data={"dataset": "npz", "path": path, "num_tasks": 2},
                 arch=[{"kind": "mlp", "widths": [4]},
                       {"name": "deep", "kind": "cnn", "channels": [4, 4, 4]}])
    with pytest.raises(ConfigError) as err:
        check_offline(study)
    assert err.value.key == "arch[1].channels"
    assert str(err.value) == ("arch[1].channels: 3 pooling blocks need an input of at least 8x8, "
                              f"got 4x4 (data.path {path!r} holds 1x4x4 samples)")


def test_valid_npz_note(tmp_path: Path) -> None:
    path = npz(tmp_path, **images(side=8))
    study = make(tmp_path, data={"dataset": "npz", "path": path, "num_tasks": 2},
                 arch=[{"kind": "cnn", "channels": [4, 4, 4]}])
    assert check_offline(study)[0] == ("data: 2 data.npz tasks of 2 classes, samples 1x8x8, "
                                       "16 train / 4 test each")


# ----------------------------------------------------------------------------- offline: store


def test_store_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "store").write_text("x")
    with pytest.raises(StoreError) as err:
        check_offline(make(tmp_path))
    assert str(err.value) == (f"study.store {str(tmp_path / 'store')!r} is a file, not a folder; "
                              "set study.store to a new or empty folder")


def test_store_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    study = make(tmp_path, study={"store": str(tmp_path / "file" / "sub" / "store")})
    with pytest.raises(StoreError, match=r"cannot be created: '.*/file' is a file; "):
        check_offline(study)


def test_non_empty_folder_that_is_no_store(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"is a non-empty folder without study\.json, not a "
                       r"distsim store; set study\.store to a new or empty folder$"):
        check_offline(make(tmp_path))
    assert (tmp_path / "store" / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_unwritable_folder_chmod(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="is not writable by this user"):
            check_offline(make(tmp_path, study={"store": str(locked)}))
        with pytest.raises(StoreError, match=r"cannot be created: .*'locked' is not writable"):
            check_offline(make(tmp_path, study={"store": str(locked / "a" / "store")}))
    finally:
        locked.chmod(0o700)


def test_unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same refusals as under chmod, for runs as root (os.access is what decides)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(preflight.os, "access",
                        lambda p, mode: Path(p) != locked and real(p, mode))
    with pytest.raises(StoreError) as err:
        check_offline(make(tmp_path, study={"store": str(locked)}))
    assert str(err.value) == (f"study.store {str(locked)!r} is not writable by this user; fix the "
                              "folder's permissions or set study.store to a folder you can write")
    with pytest.raises(StoreError) as err:
        check_offline(make(tmp_path, study={"store": str(locked / "a" / "store")}))
    assert str(err.value).startswith(f"study.store {str(locked / 'a' / 'store')!r} cannot be "
                                     f"created: {str(locked)!r} is not writable by this user;")


def test_store_notes_empty_resumable_done_and_other_study(tmp_path: Path) -> None:
    study = make(tmp_path)
    root = tmp_path / "store"
    root.mkdir()
    assert check_offline(study)[1] == f"store: empty folder {root} (used on launch)"
    Store(root).check_study(study)
    assert check_offline(study)[1] == (f"store: {root} holds this study (resumes; no stage "
                                       "done yet)")
    Store(root).mark_stage("zoo")
    Store(root).mark_stage("features")
    assert check_offline(study)[1] == (f"store: {root} holds this study (resumes; done: zoo, "
                                       "features)")
    changed = make(tmp_path, train={"epochs": 2})
    assert check_offline(changed)[1] == (
        f"store: {root} holds study 'test' with another config (changed: train.epochs (1 -> 2)); "
        "launch needs --fresh (which wipes it) or a new study.store")


# ----------------------------------------------------------------------------- cluster (fake)


def test_cuda_without_gpu(tmp_path: Path) -> None:
    study = make(tmp_path, train={"device": "cuda"}, resources={"gpus_per_trial": 1})
    with pytest.raises(LaunchError) as err:
        check_cluster(study, [node(8), node(8)])
    assert str(err.value) == ("train.device = 'cuda' but the Ray cluster has no GPU (0 of 2 "
                              "nodes); use device = 'cpu' or 'auto', or add GPU nodes")


def test_cuda_of_one_arch_names_its_key(tmp_path: Path) -> None:
    study = make(tmp_path, arch=[{"kind": "mlp", "widths": [4]}, {"kind": "rnn", "hidden": 4}],
                 train={"rnn": {"device": "cuda"}})
    with pytest.raises(LaunchError, match=r"^train\.rnn\.device = 'cuda' but the Ray cluster "
                       r"has no GPU \(0 of 1 nodes\)"):
        check_cluster(study, [node(4)])


def test_cuda_with_zero_gpus_per_trial(tmp_path: Path) -> None:
    study = make(tmp_path, train={"device": "cuda"})
    with pytest.raises(LaunchError) as err:
        check_cluster(study, [node(8, gpus=1)])
    assert str(err.value) == (
        "train.device = 'cuda' but resources.gpus_per_trial = 0: Ray reserves no GPU for a "
        "trial, so trials may land on nodes without one or crowd one device unaccounted; set "
        "resources.gpus_per_trial (1: a GPU per trial, 0.25: 4 trials share one)")


def test_gpus_per_trial_without_gpu(tmp_path: Path) -> None:
    study = make(tmp_path, train={"device": "auto"}, resources={"gpus_per_trial": 0.5})
    with pytest.raises(LaunchError, match=r"^resources\.gpus_per_trial = 0\.5 but the Ray "
                       r"cluster has no GPU \(0 of 1 nodes\); trials would wait forever"):
        check_cluster(study, [node(4)])


def test_oversized_cpus_per_trial(tmp_path: Path) -> None:
    study = make(tmp_path, resources={"cpus_per_trial": 64})
    with pytest.raises(LaunchError) as err:
        check_cluster(study, [node(2), node(1)])
    assert str(err.value) == (
        "resources.cpus_per_trial = 64 fits on no node of the Ray cluster (largest: 2 CPUs, "
        "0 GPUs); trials would wait forever: lower it, or add larger nodes")


def test_oversized_gpus_per_trial(tmp_path: Path) -> None:
    study = make(tmp_path, train={"device": "cuda"}, resources={"gpus_per_trial": 2})
    with pytest.raises(LaunchError, match=r"^resources\.gpus_per_trial = 2 fits on no node of "
                       r"the Ray cluster \(largest: 8 CPUs, 1 GPU\)"):
        check_cluster(study, [node(16), node(8, gpus=1)])


def test_cpus_and_gpus_fit_separately_but_on_no_one_node(tmp_path: Path) -> None:
    study = make(tmp_path, train={"device": "cuda"},
                 resources={"gpus_per_trial": 1, "cpus_per_trial": 8})
    with pytest.raises(LaunchError, match=r"^resources\.cpus_per_trial = 8 with gpus_per_trial "
                       r"= 1 fits on no node .*\(the nodes with at least 1 GPU have at most "
                       r"4 CPUs\)"):
        check_cluster(study, [node(16), node(4, gpus=1)])


def test_oversized_cpus_per_actor(tmp_path: Path) -> None:
    study = make(tmp_path, resources={"cpus_per_actor": 8})
    with pytest.raises(LaunchError) as err:
        check_cluster(study, [node(4), node(2)])
    assert str(err.value) == (
        "resources.cpus_per_actor = 8 fits on no node of the Ray cluster (largest: 4 CPUs); "
        "feature actors would wait forever: lower it, or add larger nodes")


def test_fitting_requests_pass(tmp_path: Path) -> None:
    check_cluster(make(tmp_path), [node(1)])
    gpu = make(tmp_path, train={"device": "cuda"},
               resources={"gpus_per_trial": 0.25, "cpus_per_trial": 2, "cpus_per_actor": 4})
    check_cluster(gpu, [node(4, head=True), node(8, gpus=1)])


def test_dead_nodes_are_ignored(tmp_path: Path) -> None:
    study = make(tmp_path, train={"device": "cuda"}, resources={"gpus_per_trial": 1})
    with pytest.raises(LaunchError, match=r"has no GPU \(0 of 1 nodes\)"):
        check_cluster(study, [node(4), node(64, gpus=8, alive=False)])
    with pytest.raises(LaunchError, match="has no alive node"):
        check_cluster(make(tmp_path), [node(4, alive=False)])


def test_autoscaler_node_types_count_as_nodes(tmp_path: Path) -> None:
    study = make(tmp_path, train={"device": "cuda"},
                 resources={"gpus_per_trial": 1, "cpus_per_trial": 4})
    head = [node(4, head=True)]
    check_cluster(study, head, node_types=[{"CPU": 4}, {"CPU": 8, "GPU": 1}])
    with pytest.raises(LaunchError, match=r"has no GPU \(0 of 1 nodes, nor any node type its "
                       r"autoscaler can add\)"):
        check_cluster(study, head, node_types=[{"CPU": 16}])
    big = make(tmp_path, resources={"cpus_per_trial": 32})
    with pytest.raises(LaunchError, match=r"= 32 fits on no node of the Ray cluster, nor any "
                       r"node type its autoscaler can add \(largest: 16 CPUs, 0 GPUs\)"):
        check_cluster(big, head, node_types=[{"CPU": 16}])
    check_cluster(big, head, node_types=[{}])  # a type of unknown size: no capacity check


def test_project_cluster_yaml_runs_the_gpu_job(tmp_path: Path) -> None:
    """cluster.yaml's CPU head with GPU workers scaling from zero: the GPU job passes only
    because the autoscaler's node types count."""
    types = bootstrap_node_types(ROOT / "cluster.yaml")
    assert types == [{"CPU": 4.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}]
    text = (ROOT / "jobs" / "cifar100-gpu.toml").read_text()
    job = parse_study(text.replace("/mnt/shared/stores", str(tmp_path)), base_dir=tmp_path)
    head = [node(4, head=True)]
    check_cluster(job, head, node_types=types)
    with pytest.raises(LaunchError, match="no GPU"):
        check_cluster(job, head)
    assert bootstrap_node_types(tmp_path / "missing.yaml") is None


def test_the_gpu_job_runs_its_tests_on_gpus_and_is_refused_without_them(tmp_path: Path
                                                                          ) -> None:
    """jobs/cifar100-gpu.toml asks a GPU share for its pairs and tests tasks, with the backends
    left to "auto"; a cluster without GPUs refuses it in one line, and refuses the tests' share
    itself once the zoo asks for none."""
    text = (ROOT / "jobs" / "cifar100-gpu.toml").read_text().replace("/mnt/shared/stores",
                                                                     str(tmp_path))
    job = parse_study(text, base_dir=tmp_path)
    assert job.resources.gpus_per_test == 0.25
    assert (job.tests.backend, job.pairs.backend) == ("auto", "auto")
    cpus = [node(4, head=True), node(16)]
    with pytest.raises(LaunchError, match="no GPU") as refused:
        check_cluster(job, cpus)
    assert "\n" not in str(refused.value)
    zoo_on_cpus = text.replace('device = "cuda"', 'device = "cpu"').replace(
        "gpus_per_trial = 0.25", "gpus_per_trial = 0")
    with pytest.raises(LaunchError, match=r"^resources\.gpus_per_test = 0\.25 but the Ray "
                       r"cluster has no GPU \(0 of 2 nodes\); the pairs and tests tasks would "
                       r"wait forever") as refused:
        check_cluster(parse_study(zoo_on_cpus, base_dir=tmp_path), cpus)
    assert "\n" not in str(refused.value)
    check_cluster(job, [*cpus, node(8, gpus=1)])  # one GPU worker: trials and tests fit


# ----------------------------------------------------------------------------- the real Ray


@pytest.mark.ray
def test_session_ray(ray_session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's local Ray (2 CPUs, no GPU, no autoscaler config)."""
    monkeypatch.setattr(preflight, "BOOTSTRAP_CONFIG", str(tmp_path / "none.yaml"))
    assert preflight.autoscaler_node_types(ray_session.nodes()) == []
    check_cluster(make(tmp_path))
    with pytest.raises(LaunchError, match=r"^train\.device = 'cuda' but the Ray cluster has no "
                       r"GPU \(0 of \d+ nodes\)"):
        check_cluster(make(tmp_path, train={"device": "cuda"}, resources={"gpus_per_trial": 1}))
    with pytest.raises(LaunchError, match=r"^resources\.cpus_per_trial = 64 fits on no node of "
                       r"the Ray cluster \(largest: 2 CPUs, 0 GPUs\)"):
        check_cluster(make(tmp_path, resources={"cpus_per_trial": 64}))


def test_a_protocol_that_cannot_split_the_zoo_is_refused_offline(tmp_path: Path) -> None:
    study = make(tmp_path, tests={"protocols": ["closed-set", "open-set"]})
    with pytest.raises(ConfigError, match=r"^tests.protocols: open-set HTT needs at least 4 "
                                          r"tasks, data.num_tasks is 2$"):
        check_offline(study)
    assert check_offline(study, stages=("zoo", "features"))  # no tests stage: not checked
    study = make(tmp_path, data={"num_tasks": 4}, train={"seeds_per_task": 3},
                 tests={"protocols": ["open-set"], "n_query": 3})
    with pytest.raises(ConfigError, match=r"^tests.protocols: open-set cannot split 4 tasks x 3 "
                                          r"seeds: n_query=3 leaves no gallery"):
        check_offline(study)
