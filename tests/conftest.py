"""Shared fixtures: one local Ray instance per test session, shut down at the end; one finished
store launched on it once and shared (`finished_study`, read-only); the study file builder
(`study_toml`, from `tests/_study.py`)."""

from __future__ import annotations

import os

import _study
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray (2 CPUs, no dashboard) shared by every Ray test; shut down cleanly afterwards."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def finished_study(ray_session, tmp_path_factory):
    """The study file (a Path) of a finished store shared by the whole session: `FINISHED_STUDY`
    of `tests/_study.py` (4 synthetic tasks x 3 seeds of a tiny mlp, cnn and rnn, every stage),
    launched once on the session's Ray into a tmp_path_factory folder, its store at
    `<folder>/store`. This launch is the fast tier's one end-to-end run.

    Read it only (query, report, results, export, verify): a test that changes a store copies
    it first, `shutil.copytree(store_root, tmp_path / "store")`.
    """
    import io

    from distsim.config import load_study
    from distsim.pipeline.launch import run_study

    folder = tmp_path_factory.mktemp("finished")
    path = folder / "three.toml"
    path.write_text(_study.study_toml(_study.FINISHED_STUDY,
                                      study={"store": str(folder / "store")}))
    run_study(load_study(path), stream=io.StringIO())
    return path


@pytest.fixture
def study_toml():
    """`_study.study_toml`: `study_toml(**sections) -> str`, the TOML text of a small default
    study (synthetic data, 2 tasks, one mlp with widths [4], 3 seeds per task, 1 epoch) where
    a dict merges into its section (`None` keys removed), `None` removes the section and a
    list or scalar replaces it; a full study dict passed first replaces the default.

    Module constants and module-scoped fixtures import the function itself:
    `from _study import study_toml`.
    """
    return _study.study_toml


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is a collection error elsewhere
        return False


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device on this machine")
    if not _cuda_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (the packed-trainer tests compare bit for bit)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def task():
    """A small digits task (digits:0v4, 270 train / 89 test samples) for the trainer tests."""
    from distsim.config.data import DataConfig
    from distsim.zoo.tasks import make_tasks

    return make_tasks(DataConfig(num_tasks=3, seed=0))[2]
