"""The launch: connect to Ray, bind the store, run the registry's stages, print the summary.

Ray connection (and only what it started is shut down):
- Ray already initialized in this process (a test's session fixture): use it, leave it running.
- ``address`` (``"auto"``, ``"HOST:PORT"``) or ``RAY_ADDRESS``: join that cluster; disconnect
  at the end (the cluster keeps running).
- otherwise: start a local Ray sized to the machine (all its CPUs, no dashboard) and shut it
  down at the end.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Any, TextIO

from distsim.config import Study
from distsim.errors import LaunchError
from distsim.pipeline.registry import STAGE_NAMES, STAGES
from distsim.pipeline.stage import RunContext
from distsim.report import format_summary, summary_table
from distsim.store import Store
from distsim.store.shards import temp_path


def _connect(address: str | None) -> tuple[bool, str]:
    """Make sure this process is connected to Ray; returns (we started/joined it, description)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name in ("ray.tune", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if ray.is_initialized():
        return False, "the Ray instance this process already holds"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=True, logging_level=logging.WARNING)
        except Exception as exc:  # ConnectionError, AuthenticationError, ValueError, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise LaunchError(
                f"cannot join the Ray cluster at {address!r} ({type(exc).__name__}: "
                f"{first[:300]}); check the address (`ray status` on the head), and set "
                "RAY_AUTH_MODE=token when the "
                "cluster uses token authentication"
            ) from None
        return True, f"Ray cluster at {address}"
    # A private local instance: Ray's notice that it turned token auth on is noise here.
    token_setup = "ray._private.authentication.authentication_token_setup"
    logging.getLogger(token_setup).setLevel(logging.ERROR)
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
             log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
    return True, f"a local Ray ({os.cpu_count()} CPUs)"


def check_reachable(address: str) -> None:
    """Fail fast (LaunchError) on a HOST:PORT nobody listens on; ray.init would retry for
    minutes."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto", ray:// client addresses: left to ray.init
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except OSError as exc:
        raise LaunchError(
            f"cannot join the Ray cluster at {address!r}: nothing answers there "
            f"({exc.strerror or exc}); start one with `ray start --head` or `ray up cluster.yaml`, "
            "or drop --address for a local Ray"
        ) from None


def check_shared_store(store: Store) -> int:
    """Check that every alive Ray node sees the store folder (a multi-node cluster needs shared
    storage for the store and for Tune's storage_path inside it); returns the node count."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return len(nodes)
    store.root.mkdir(parents=True, exist_ok=True)
    probe = temp_path(store.root, "probe")  # a temp name: --fresh deletes one a crash left
    probe.write_text("distsim")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return os.path.isfile(path)

    try:
        refs = {
            n["NodeManagerAddress"] + " (" + n["NodeID"][:12] + ")": sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(probe))
            for n in nodes
        }
        blind = [name for name, ref in refs.items() if not ray.get(ref, timeout=120)]
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise LaunchError(
            f"study.store {str(store.root)!r} is not visible from Ray node(s) {', '.join(blind)}: "
            "on a multi-node cluster the store (and Tune's storage_path inside it) must be on "
            "storage every "
            "node mounts (NFS, EFS, a shared disk)"
        )
    return len(nodes)


def run_study(
    study: Study,
    address: str | None = None,
    stages: tuple[str, ...] | list[str] | None = None,
    fresh: bool = False,
    *,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Run the study's stages on Ray (each skipping what its store holds) and print the summary.

    Returns {"store": path, "outcome": created|resumed|fresh, "stages": {stage: counts},
    "seconds": wall time, "nodes": Ray nodes, "summary": polars DataFrame of the tests}.
    Raises StoreError (a changed study without ``fresh``) or LaunchError (a stage whose input
    is missing, a store the cluster's nodes cannot all reach).
    """
    if not isinstance(study, Study):
        raise TypeError(f"run_study takes a distsim.config.Study, got {type(study).__name__}")
    names = STAGE_NAMES if stages is None else tuple(stages)
    unknown = [s for s in names if s not in STAGE_NAMES]
    if unknown or not names:
        raise ValueError(f"stages must be a non-empty subset of {STAGE_NAMES}, got {list(names)}")
    chosen = [stage for stage in STAGES if stage.name in names]
    out = stream if stream is not None else sys.stderr
    start = time.perf_counter()
    store = Store(study.store)
    outcome = store.check_study(study, fresh=fresh)
    print(f"distsim: study {study.name!r} ({outcome} store {store.root})", file=out, flush=True)

    import ray

    done: dict[str, Any] = {}
    nodes = 0
    if not any(pending_work(study, store, [s.name for s in chosen]).values()):
        print("distsim: the store holds every stage's output; nothing to run", file=out, flush=True)
        chosen = []
    started, where = _connect(address) if chosen else (False, "")
    try:
        if chosen:
            nodes = check_shared_store(store)
            cpus = int(ray.cluster_resources().get("CPU", 1))
            print(f"distsim: running {', '.join(s.name for s in chosen)} on {where}, {nodes} "
                  f"node(s), {cpus} CPUs", file=out, flush=True)
            ctx = RunContext(stream=out, cpus=cpus)
        for stage in chosen:
            t0 = time.perf_counter()
            info = stage.run(study, store, ctx)
            info["seconds"] = round(time.perf_counter() - t0, 2)
            done[stage.name] = info
            worked = any(v for k, v in info.items() if k not in ("skipped", "seconds"))
            if stage.complete(study, store) and (worked or stage.name not in store.stages()):
                store.mark_stage(stage.name, **info)
    finally:
        if started:
            ray.shutdown()
    table = summary_table(store, study)
    seconds = time.perf_counter() - start
    print(format_summary(table), file=out)
    print(f"distsim: done in {seconds:.1f} s (store {store.root})", file=out, flush=True)
    return {"store": str(store.root), "outcome": outcome, "stages": done, "seconds": seconds,
            "nodes": nodes, "summary": table}


def pending_work(study: Study, store: Store, stages: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Units of work each named stage would do now, read from the store; a stage downstream
    of unfinished work counts as pending (1) without looking further."""
    out: dict[str, int] = {}
    upstream = False
    for stage in STAGES:
        n = 1 if upstream else stage.pending(study, store)
        out[stage.name] = n
        upstream = upstream or n > 0
    return {s: out[s] for s in stages}
