"""A full, read-only or failing store stops the launch at once, in one line, and a relaunch after
the fix completes with nothing lost.

The real faults need a small filesystem: a tmpfs mounted in the test (as root; skipped where
`mount` is refused). The same paths are also driven by injected errors (``DISTSIM_FAULTS``
``errno=N``: every kind of unit, any user), and the preflight refusal by a study too large for
any disk."""

from __future__ import annotations

import errno
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _procs import DISTSIM, launch_env
from _study import study_toml
from test_reliability import SECTIONS, _assert_same, _run, _study

from distsim.config import parse_study
from distsim.errors import StorageError, StoreError
from distsim.pipeline import faults
from distsim.pipeline.io_errors import find
from distsim.pipeline.space import estimate, stored_bytes
from distsim.store import Store
from distsim.store.verify import verify_store


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 160 KB tmpfs at tmp_path/fs (unmounted afterwards); skipped where mount is refused."""
    folder = tmp_path / "fs"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def _remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory) -> Store:
    """The study run once without faults."""
    study = _study(tmp_path_factory.mktemp("disk"), "reference")
    _run(study)
    return Store(study.store)


# ----------------------------------------------------------------------------- no Ray
def test_a_study_no_disk_can_hold_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from distsim.pipeline.launch import run_study

    huge = parse_study(study_toml(
        study={"store": str(tmp_path / "store")}, data={"num_tasks": 100},
        arch=[{"kind": "mlp", "widths": [2048, 2048]}], features={"methods": ["chain-gram"]},
        train={"seeds_per_task": 100_000, "seeds_per_trial": 100_000}))
    with pytest.raises(StoreError, match=r"study.store '.*store': its filesystem \(at /.*\) has "
                                         r"[\d,.]+ MB free and the study needs about [\d,.]+ MB "
                                         r"more \(the whole store about .*weights .*\); .*"
                                         r"--no-space-check"):
        run_study(huge)
    assert not (tmp_path / "store").exists()


JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("job", ["quickstart", "resnet-mnist1d", "transformer-mnist1d",
                                 "sweep-digits", "import-state-dicts"])
def test_every_arch_kind_is_estimated_and_an_import_is_not(job: str) -> None:
    from distsim.config import load_study

    sizes = estimate(load_study(JOBS / f"{job}.toml"))
    if job.startswith("import"):
        assert sizes is None
        return
    assert sizes is not None and sizes["weights"] > 0 and sizes["features"] > 0


@pytest.mark.ray
@pytest.mark.e2e
def test_the_estimate_is_near_what_a_finished_store_takes(finished_study: Path) -> None:
    from distsim.config import load_study

    study = load_study(finished_study)
    sizes = estimate(study)
    assert sizes is not None
    held = stored_bytes(Path(study.store))
    print(f"estimate {sum(sizes.values())} bytes, store {held} bytes")
    assert held <= sum(sizes.values()) <= 1.3 * held  # measured: 10% over (quickstart's: 5%)


@pytest.mark.parametrize(("text", "name", "path"), [
    ("OSError: [Errno 28] No space left on device: '/s/weights/x.parquet'", "ENOSPC",
     "/s/weights/x.parquet"),
    ("OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on "
     "device", "ENOSPC", None),  # pyarrow's
    ("polars.exceptions.ComputeError: Read-only file system (os error 30)", "EROFS", None),
    ("PermissionError: [Errno 13] Permission denied: '/s/_tune'", "EACCES", "/s/_tune"),
    ("Last sync command failed with the following error:\nTraceback (most recent call last):\n"
     "  File ...\nOSError: [Errno 5] Input/output error", "EIO", None),  # Tune's syncer
])
def test_fatal_io_errors_are_found_in_the_texts_ray_tune_and_pyarrow_give(
        text: str, name: str, path: str | None) -> None:
    fault = find(text, "trial mlp-t0-p0")
    assert fault is not None and (fault.name, fault.path) == (name, path)
    assert find("OSError: [Errno 2] No such file or directory: '/s/x'", "x") is None  # retried
    assert find(OSError(errno.ENOSPC, "No space left on device"), "x").name == "ENOSPC"


# ----------------------------------------------------------------------------- real faults
@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_a_full_disk_stops_at_once_and_the_relaunch_after_growing_it_loses_nothing(
        reference: Store, small_fs: Path) -> None:
    study = _study(small_fs, "full")
    start = time.perf_counter()
    with pytest.raises(StorageError) as caught:
        _run(study, space_check=False)
    took = time.perf_counter() - start
    line = str(caught.value)
    print(f"stopped after {took:.1f} s: {line}")
    log = "\n".join(getattr(caught.value, "__notes__", []))  # the launch's output (_run)
    assert "\n" not in line and "failed (retrying)" not in log and "Traceback" not in log
    assert f"ENOSPC on '{small_fs}/full/" in line
    assert f"{small_fs} has 0.0 MB free of 0.2 MB; the study needs about" in line
    assert "; stored: zoo " in line and line.endswith("then the same launch resumes from there")
    assert took < 60
    _remount(small_fs, "size=64m")
    _run(study)
    assert verify_store(Store(study.store)) == []
    _assert_same(Store(study.store), reference)


def test_a_read_only_store_is_refused_in_one_line(small_fs: Path) -> None:
    _remount(small_fs, "size=64m")
    study = _study(small_fs, "ro")
    (small_fs / "ro").mkdir()
    _remount(small_fs, "ro")
    from distsim.pipeline.preflight import check_offline

    with pytest.raises(StoreError, match=r"is on a read-only file system \(EROFS, at '.*/ro'\); "
                                         "remount it read-write"):
        check_offline(study)


# ----------------------------------------------------------------------------- injected
@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize(("kind", "number", "stage"), [
    ("trial", errno.EIO, "zoo"), ("feature", errno.ENOSPC, "features"),
    ("tile", errno.EROFS, "pairs"), ("test", errno.EACCES, "tests")])
def test_an_injected_io_error_in_any_stage_stops_it_in_one_line_and_a_relaunch_completes(
        reference: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
        number: int, stage: str) -> None:
    monkeypatch.setenv(faults.ENV, f"{kind}=1,errno={number}")
    study = _study(tmp_path, kind)
    start = time.perf_counter()
    with pytest.raises(StorageError) as caught:
        _run(study)
    took = time.perf_counter() - start
    line, name = str(caught.value), find(OSError(number, ""), "").name  # type: ignore[union-attr]
    print(f"{kind}: stopped after {took:.1f} s: {line}")
    assert line.startswith(f"{stage}: stopped after ") and f" by {name} in the store " \
        f"{study.store!r}" in line
    log = "\n".join(getattr(caught.value, "__notes__", []))  # the launch's output (_run)
    assert f"injected {kind} fault" in line and "failed (retrying)" not in log
    assert took < 60
    monkeypatch.delenv(faults.ENV)
    _run(study)
    _assert_same(Store(study.store), reference)


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_an_io_error_on_the_driver_stops_the_launch_in_one_line(
        reference: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = _study(tmp_path, "driver")
    real = Store.mark_stage

    def failing(self: Store, stage: str, **info: object) -> None:
        if stage == "features":
            raise OSError(errno.EIO, "Input/output error", str(self.root / "_stages"))
        real(self, stage, **info)

    monkeypatch.setattr(Store, "mark_stage", failing)
    with pytest.raises(StorageError, match=r"^features: stopped after [\d.]+ s by EIO on "
                                           r"'.*/_stages': OSError: \[Errno 5\] Input/output "
                                           r"error; the device failed; .*; stored: zoo 16/16 "
                                           r"packs, features 16/16 packs, pairs 0/4 "):
        _run(study)
    monkeypatch.undo()
    _run(study)
    _assert_same(Store(study.store), reference)


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_the_cli_prints_one_line_and_exits_1_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text(study_toml(study={"store": str(tmp_path / "store")}, **SECTIONS))
    proc = subprocess.run([DISTSIM, "launch", str(path)], capture_output=True, text=True,
                          env=launch_env(DISTSIM_FAULTS="tile=1,errno=28"), timeout=300)
    errors = [s for s in proc.stderr.splitlines() if s.startswith("error:")]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: pairs: stopped after "), errors
    assert "Traceback" not in proc.stderr and "ENOSPC" in errors[0], proc.stderr[-2000:]

