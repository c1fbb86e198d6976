"""The launch: connect to Ray, bind the store, run the registry's stages, print the summary.

Ray connection (and only what it started is shut down):
- Ray already initialized in this process (a test's session fixture): use it, leave it running.
- ``address`` (``"auto"``, ``"HOST:PORT"``) or ``RAY_ADDRESS``: join that cluster; disconnect
  at the end (the cluster keeps running).
- otherwise: start a local Ray sized to the machine (all its CPUs, no dashboard) and shut it
  down at the end.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from distsim.config import Study
from distsim.errors import IncompleteError, LaunchError, StorageError
from distsim.pipeline import faults
from distsim.pipeline.io_errors import IOFault, find, message
from distsim.pipeline.preflight import check_cluster, check_offline
from distsim.pipeline.registry import STAGE_NAMES, STAGES
from distsim.pipeline.restore import restore_study
from distsim.pipeline.signals import Interrupted, StopOnSignals
from distsim.pipeline.space import check_space, space_line
from distsim.pipeline.stage import Outputs, RunContext
from distsim.store import TABLES, Store, lineage
from distsim.store.lock import StoreLock
from distsim.store.shards import temp_path
from distsim.summary import format_summary, summary_table


def _connect(address: str | None) -> tuple[bool, str]:
    """Make sure this process is connected to Ray; returns (we started/joined it, description)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # no native stack dump and abort on SIGTERM: the launch's own handler ends it cleanly
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    # every result a stage needs is collected and its errors reported in one line; the only
    # unread ones are of trials a stopped stage left behind (their tracebacks are noise)
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
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
    partial: bool = False,
    confirm: Callable[[str], bool] | None = None,
    stream: TextIO | None = None,
    space_check: bool = True,
) -> dict[str, Any]:
    """Run the study's stages on Ray (each skipping what its store holds) and print the summary.

    Order: offline checks, the store's binding and launch lock (an unreadable study.json is
    rewritten from `study` when the store's tables match it, distsim.pipeline.restore; else
    StoreError), Ray and the cluster checks,
    then (``fresh``) ``confirm(question)`` when given and the wipe, then the stages. A stage
    runs only when every stage before it is complete, unless ``partial`` (then it says so and
    its marker records it). SIGINT/SIGTERM end the launch (:class:`Interrupted`) with one line
    saying what is stored. Before Ray starts, a launch with work to do checks that the store's
    filesystem can hold what the study still needs (distsim.pipeline.space; ``space_check``
    False skips it); a full, read-only or failing store met later stops it at once.

    Returns {"store": path, "outcome": created|resumed|fresh, "stages": {stage: counts},
    "seconds": wall time, "nodes": Ray nodes, "summary": polars DataFrame of the tests}.
    Raises a DistsimError: StoreError (a changed study without ``fresh``, a locked store),
    LaunchError (a cluster that cannot run it), IncompleteError (units that failed after
    their retries; a relaunch resumes), StorageError (a full, read-only or failing store: one
    line naming the path, the error and, for a full disk, the space; nothing retried).
    """
    if not isinstance(study, Study):
        raise TypeError(f"run_study takes a distsim.config.Study, got {type(study).__name__}")
    names = STAGE_NAMES if stages is None else tuple(stages)
    unknown = [s for s in names if s not in STAGE_NAMES]
    if unknown or not names:
        raise LaunchError(f"stages: {unknown[0] if unknown else '(none)'!r} is not a stage; "
                          f"stages: {','.join(STAGE_NAMES)}")
    chosen = [stage for stage in STAGES if stage.name in names]
    out = stream if stream is not None else sys.stderr
    start = time.perf_counter()
    check_offline(study, stages=names)
    faults.plan()  # a malformed DISTSIM_FAULTS fails here, before Ray starts
    store = Store(study.store)
    broken = None if fresh else store.study_problem()  # an unreadable study.json
    if broken is None:
        store.binding(study, fresh=fresh)  # a changed study fails here, before the lock
    if space_check and (fresh or any(pending_work(study, store, names).values())):
        check_space(study, fresh=fresh)  # a disk too small for the study: one line, now
    with StopOnSignals(out) as signals, StoreLock(store.root, out):
        if broken is not None:  # rewritten when the tables are this study's, else StoreError
            restore_study(study, store, broken, out)
        outcome = store.binding(study, fresh=fresh)
        what = "store to wipe once the checks pass (--fresh)" if outcome == "fresh" else (
            f"{outcome} store")
        print(f"distsim: study {study.name!r} ({what} {store.root})", file=out, flush=True)
        if outcome != "fresh" and not any(pending_work(study, store, names).values()):
            print("distsim: the store holds every stage's output; nothing to run", file=out,
                  flush=True)
            chosen = []
        if not chosen:
            store.bind(study, outcome)
        done: dict[str, Any] = {}
        nodes, current = 0, "start"
        started = False
        t0 = 0.0
        ended: Outputs | None = None  # the outputs of the last stage run, read once after it
        try:
            if chosen:
                import ray

                started, where = _connect(address)
                signals.arm()  # ray.init installs a SIGTERM handler of its own
                nodes = check_shared_store(store)
                check_cluster(study)
                if outcome == "fresh":
                    _confirm_fresh(store, confirm)
                store.bind(study, outcome)
                cpus = int(ray.cluster_resources().get("CPU", 1))
                print(f"distsim: running {', '.join(s.name for s in chosen)} on {where}, "
                      f"{nodes} node(s), {cpus} CPUs", file=out, flush=True)
                ctx = RunContext(stream=out, cpus=cpus)
            for stage in chosen:
                current, t0 = stage.name, time.perf_counter()
                upstream = _gate(study, store, stage.name, done, partial, out)
                info = stage.run(study, store, ctx)
                info["seconds"] = round(time.perf_counter() - t0, 2)
                if upstream:
                    info["partial"] = True
                done[stage.name] = info
                worked = any(v for k, v in info.items() if k not in ("skipped", "seconds"))
                ended = stage.outputs(study, store)
                if not ended.complete:
                    store.note_unfinished(stage.name, info["seconds"])
                elif worked or stage.name not in store.stages():
                    store.mark_stage(stage.name, **info)
            current = "summary"
        except KeyboardInterrupt:  # Ray or Tune may re-raise ours as a plain one
            if current in STAGE_NAMES:
                store.note_unfinished(current, time.perf_counter() - t0)
            if started:
                ray.shutdown()
                started = False
            stop = Interrupted(signals.signum or signal.SIGINT)
            print(f"distsim: interrupted by {stop} during {current} after "
                  f"{time.perf_counter() - start:.1f} s; stored: {stored_line(study, store)}; "
                  "the same launch again resumes from there", file=out, flush=True)
            raise stop from None
        except (IOFault, OSError) as exc:  # a full, read-only or failing store: stop now
            fault = exc if isinstance(exc, IOFault) else find(exc, "the driver")
            if fault is None:
                raise
            if started:
                ray.shutdown()
                started = False
            raise StorageError(_fault_line(study, store, fault, current,
                                           time.perf_counter() - (t0 or start))) from None
        finally:
            if started:
                ray.shutdown()
    if ended is not None and not ended.complete:  # chosen ends with the last stage named
        raise IncompleteError(f"{chosen[-1].name}: {ended} after this launch; "
                              f"{_first_error(done)}a relaunch redoes the missing units")
    table = summary_table(store, study)
    seconds = time.perf_counter() - start
    print(format_summary(table, store.root, study.tests.group_by, study.tests.strata), file=out)
    if any(info.get("partial") for info in done.values()):
        print("distsim: PARTIAL: these results were computed on an incomplete upstream "
              "(see above); `distsim status` shows which stages", file=out)
    print(f"distsim: done in {seconds:.1f} s (store {store.root})", file=out, flush=True)
    return {"store": str(store.root), "outcome": outcome, "stages": done, "seconds": seconds,
            "nodes": nodes, "summary": table}


def _gate(study: Study, store: Store, name: str, done: dict[str, Any], partial: bool,
          out: TextIO) -> bool:
    """Let stage `name` run only on complete upstream stages: raise IncompleteError (an upstream
    stage of this launch left units failed) or LaunchError (one not run yet), or, with
    `partial`, say loudly that it runs on what is stored. True when the upstream is partial."""
    upstream = _incomplete_upstream(study, store, name)
    if not upstream:
        return False
    why = "; ".join(f"{s} {o}" for s, o in upstream)
    if partial:
        print(f"distsim: PARTIAL: {name} runs on an incomplete upstream ({why}); its outputs "
              "cover only what is stored", file=out, flush=True)
        return True
    if not any(s in done for s, _ in upstream):
        raise LaunchError(f"{name}: not run, its upstream is incomplete ({why}); run the "
                          f"{upstream[0][0]} stage first, or pass --partial to run {name} on "
                          "what is stored")
    raise IncompleteError(f"{name}: not run, its upstream is incomplete ({why}); "
                          f"{_first_error(done)}a relaunch redoes the missing units, or pass "
                          "--partial to run the later stages on what is stored")


def _fault_line(study: Study, store: Store, fault: IOFault, stage: str, seconds: float) -> str:
    """The line of a launch stopped by a fatal I/O error: the error, the space (a full disk),
    what to do, and what is stored."""
    if stage in STAGE_NAMES:
        try:
            store.note_unfinished(stage, seconds)
        except OSError:
            pass  # the same disk: the marker is a courtesy
    full = fault.errno in (errno.ENOSPC, errno.EDQUOT)
    what = message(fault, store.root, space_line(study, store.root) if full else None)
    return (f"{stage}: stopped after {seconds:.1f} s by {what}; stored: "
            f"{stored_line(study, store)}; then the same launch resumes from there")


def _first_error(done: dict[str, Any]) -> str:
    cause = next((info["error"] for info in done.values() if "error" in info), None)
    return f"first cause: {cause[:300]}; " if cause else ""


def _incomplete_upstream(study: Study, store: Store, name: str) -> list[tuple[str, Outputs]]:
    """(stage, outputs) of every stage before `name` whose outputs are incomplete."""
    out = []
    with lineage.one_read():
        for stage in STAGES:
            if stage.name == name:
                break
            outputs = stage.outputs(study, store)
            if not outputs.complete:
                out.append((stage.name, outputs))
    return out


def _confirm_fresh(store: Store, confirm: Callable[[str], bool] | None) -> None:
    """Ask before wiping a store that holds something (LaunchError when refused)."""
    held = store.read_study(strict=False)
    shards = sum(len(store.shard_files(t)) for t in TABLES)
    if confirm is None or (held is None and not shards):
        return
    what = f"study {held.get('name')!r}" if held else "a study"
    if not confirm(f"--fresh deletes {what} in {store.root} ({shards} shard files); go on?"):
        raise LaunchError("--fresh: not confirmed; nothing was deleted")


def stage_states(study: Study, store: Store) -> list[tuple[str, str, Outputs]]:
    """(stage, state, outputs) of every stage: state "complete", "partial" (outputs missing, or
    all there but computed on an incomplete upstream), "stale" (some computed from upstream
    rows that changed since) or "pending" (nothing stored)."""
    out: list[tuple[str, str, Outputs]] = []
    upstream_complete = True
    with lineage.one_read():
        outputs = [stage.outputs(study, store) for stage in STAGES]
    for stage, o in zip(STAGES, outputs, strict=True):
        if o.stale:
            state = "stale"
        elif o.complete:
            state = "complete" if upstream_complete else "partial"
        else:
            state = "partial" if o.done else "pending"
        out.append((stage.name, state, o))
        upstream_complete = upstream_complete and o.complete
    return out


def stored_line(study: Study, store: Store) -> str:
    """What the store holds per stage, e.g. "zoo 14/24 packs, features 0/24 packs, ..."."""
    with lineage.one_read():
        return ", ".join(f"{s.name} {s.outputs(study, store)}" for s in STAGES)


def pending_work(study: Study, store: Store, stages: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Units of work each named stage would do now, read from the store; a stage downstream
    of unfinished work counts as pending (1) without looking further."""
    out: dict[str, int] = {}
    upstream = False
    with lineage.one_read():
        for stage in STAGES:
            n = 1 if upstream else stage.outputs(study, store).pending
            out[stage.name] = n
            upstream = upstream or n > 0
    return {s: out[s] for s in stages}
