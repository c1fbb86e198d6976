"""MNIST-1D (Greydanus & Kobak), generated locally and cached on disk: the pool of a study's tasks.

The ``mnist1d`` package's ``make_dataset`` draws 1-D signals (40 values) from 10 class
templates with random padding, scaling, translation, correlated and iid noise and shear, all
from numpy's legacy global generator seeded by ``seed``. distsim never calls the package's
download helpers: every array is generated here, offline. Generating 5000 samples takes a
second or two, so the arrays are cached, one ``<key>.npz`` per set of arguments, in
``$DISTSIM_CACHE/mnist1d/`` (default ``~/.cache/distsim/mnist1d/``); the key hashes every
argument of the generator and the package's version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import tempfile
import threading
from pathlib import Path

import numpy as np

from distsim.config.data import MNIST1D_CLASSES, MNIST1D_SHAPE, MNIST1DArgs

CACHE_ENV = "DISTSIM_CACHE"
CACHE_FORMAT = 1  # version of the cache file's layout, part of its key

_GENERATE_LOCK = threading.Lock()  # make_dataset seeds and draws from numpy's global generator


def mnist1d_version() -> str:
    """The installed mnist1d package's version (part of the cache key)."""
    return importlib.metadata.version("mnist1d")


def cache_dir() -> Path:
    """Where the generated arrays are kept: ``$DISTSIM_CACHE/mnist1d`` or
    ``~/.cache/distsim/mnist1d``."""
    root = os.environ.get(CACHE_ENV) or str(Path("~/.cache/distsim").expanduser())
    return Path(root) / "mnist1d"


def cache_key(args: MNIST1DArgs) -> str:
    """24 hex digits of sha256 over every generator argument, the package version and the
    cache format: any change gives another file."""
    blob = json.dumps({"args": args.package_args(), "mnist1d": mnist1d_version(),
                       "format": CACHE_FORMAT}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_path(args: MNIST1DArgs) -> Path:
    """The cache file of one set of arguments."""
    return cache_dir() / f"{cache_key(args)}.npz"


def generate_mnist1d(args: MNIST1DArgs) -> tuple[np.ndarray, np.ndarray]:
    """Fresh MNIST-1D, the package's train and test split merged in its order: x (N, 1, 40)
    float32, y (N,) int64, N = args.num_samples. Bit-identical for equal args; numpy's and
    Python's global random states are restored afterwards."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    with _GENERATE_LOCK:  # the package seeds and draws from the legacy global generators
        np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
        try:
            data = make_dataset(ObjectView(args.package_args()))
        finally:
            np.random.set_state(np_state)  # noqa: NPY002
            random.setstate(py_state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return np.ascontiguousarray(x.reshape(len(x), *MNIST1D_SHAPE)), y


def load_mnist1d(args: MNIST1DArgs) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-1D as :func:`generate_mnist1d` gives it, read from the cache when a valid file is
    there, else generated and written (atomically; a corrupt file is replaced, an unwritable
    cache folder only means no cache)."""
    path = cache_path(args)
    cached = _read(path, args.num_samples)
    if cached is not None:
        return cached
    x, y = generate_mnist1d(args)
    _write(path, x, y)
    return x, y


def _read(path: Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (x, y), or None when the file is missing or not what we write."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except Exception:  # missing, truncated, not a zip, missing arrays: regenerate
        return None
    ok = (x.dtype == np.float32 and x.shape == (n, *MNIST1D_SHAPE) and y.dtype == np.int64
          and y.shape == (n,) and bool(np.isfinite(x).all())
          and bool(((y >= 0) & (y < MNIST1D_CLASSES)).all()))
    return (x, y) if ok else None


def _write(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write (x, y) to a temp file in path's folder, then rename it onto path."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=x, y=y)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from a shared cache's users
        os.replace(tmp, path)
    except OSError:  # a read-only or full disk: the arrays are still right, only not kept
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)

