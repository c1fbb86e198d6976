"""``run_study``: connect to Ray, check the store, run the stages, print the summary table.

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
import uuid
from typing import Any, TextIO

import polars as pl

from distsim.config import Study
from distsim.pipeline import LaunchError
from distsim.store import STAGES, Store

ZOO_DOWNSTREAM = ("neighbors", "pairs", "tests")  # built from a whole arch's feature matrix


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
        _check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=True, logging_level=logging.WARNING)
        except Exception as exc:  # ConnectionError, AuthenticationError, ValueError, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise LaunchError(
                f"cannot join the Ray cluster at {address!r} ({type(exc).__name__}: {first[:300]}); "
                "check the address (`ray status` on the head), and set RAY_AUTH_MODE=token when the "
                "cluster uses token authentication"
            ) from None
        return True, f"Ray cluster at {address}"
    # A private local instance: Ray's notice that it turned token auth on is noise here.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level=logging.WARNING)
    return True, f"a local Ray ({os.cpu_count()} CPUs)"


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on (ray.init would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto", ray:// client addresses: left to ray.init
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except OSError as exc:
        raise LaunchError(
            f"cannot join the Ray cluster at {address!r}: nothing answers there ({exc.strerror or exc}); "
            "start one with `ray start --head` or `ray up cluster.yaml`, or drop --address for a local Ray"
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
    probe = store.root / f".probe-{uuid.uuid4().hex}"
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
            f"study.store {str(store.root)!r} is not visible from Ray node(s) {', '.join(blind)}: on a "
            "multi-node cluster the store (and Tune's storage_path inside it) must be on storage every "
            "node mounts (NFS, EFS, a shared disk)"
        )
    return len(nodes)


def _clear_downstream(store: Store, archs: set[str]) -> None:
    """Remove the all-models shards (pairs, neighbors, tests) of archs whose zoo gained packs:
    they were computed from a smaller feature matrix and would be stale."""
    for table in ZOO_DOWNSTREAM:
        for key in store.shard_keys(table):
            if key["arch"] in archs:
                store.shard_path(table, key).unlink(missing_ok=True)


def summary_table(store: Store, study: Study) -> pl.DataFrame:
    """Per arch, layer, method and test: statistic, observed, chance, p-value, permutations."""
    df = store.scan("tests").collect()
    if df.height == 0:
        return df
    arch_order = {a: i for i, a in enumerate(study.arch_names)}
    layer_order = {(a, layer): i for a in study.arch_names for i, layer in enumerate(study.feature_layers(a))}
    method_order = {m: i for i, m in enumerate(study.features.methods)}
    protocols = ("closed-set", "open-set", "permanova")
    df = df.with_columns(
        pl.struct("arch", "layer", "method", "protocol").map_elements(
            lambda r: (arch_order.get(r["arch"], 99), layer_order.get((r["arch"], r["layer"]), 99),
                       method_order.get(r["method"], 99),
                       protocols.index(r["protocol"]) if r["protocol"] in protocols else 9),
            return_dtype=pl.List(pl.Int64),
        ).alias("_order")
    ).sort("_order").drop("_order")
    return df.select("arch", "layer", "method", "protocol", "statistic", "observed", "chance",
                     "null_mean", "p_value", "permutations", "n_models")


def format_summary(df: pl.DataFrame) -> str:
    """The summary as a fixed-width text table: one row per arch, layer, method and test."""
    if df.height == 0:
        return "(no tests in the store yet)"
    cols = [("arch", "arch", "<"), ("layer", "layer", "<"), ("method", "method", "<"), ("test", "protocol", "<"),
            ("statistic", "statistic", "<"), ("observed", "observed", ">"), ("chance", "chance", ">"),
            ("null mean", "null_mean", ">"), ("p", "p_value", ">"), ("B", "permutations", ">")]

    def cell(name: str, value: Any) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "-"
        if name == "p_value":
            return f"{value:.4f}"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    rows = [[cell(c, r[c]) for _, c, _ in cols] for r in df.iter_rows(named=True)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (h, _, _) in enumerate(cols)]
    fmt = lambda values: "  ".join(f"{v:{a}{w}}" for v, (_, _, a), w in zip(values, cols, widths, strict=True))  # noqa: E731
    head = fmt([h for h, _, _ in cols])
    return "\n".join([head, "-" * len(head), *(fmt(row) for row in rows)])


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
    stages = tuple(STAGES if stages is None else stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {list(stages)}")
    stages = tuple(s for s in STAGES if s in stages)
    out = stream if stream is not None else sys.stderr
    start = time.perf_counter()
    store = Store(study.store)
    outcome = store.check_study(study, fresh=fresh)
    print(f"distsim: study {study.name!r} ({outcome} store {store.root})", file=out, flush=True)

    import ray

    from distsim.pipeline.features import run_features
    from distsim.pipeline.pairs import run_pairs
    from distsim.pipeline.tests import run_tests
    from distsim.pipeline.zoo import run_zoo

    done: dict[str, Any] = {}
    nodes = 0
    if not any(pending_work(study, store, stages).values()):
        print("distsim: the store holds every stage's output; nothing to run", file=out, flush=True)
        stages = ()
    started, where = _connect(address) if stages else (False, "")
    try:
        if stages:
            nodes = check_shared_store(store)
            cpus = int(ray.cluster_resources().get("CPU", 1))
            print(f"distsim: running {', '.join(stages)} on {where}, {nodes} node(s), {cpus} CPUs",
                  file=out, flush=True)
        for stage in stages:
            t0 = time.perf_counter()
            if stage == "zoo":
                info = run_zoo(study, store, stream=out)
                _clear_downstream(store, set(info.pop("archs")))
            elif stage == "features":
                info = run_features(study, store, stream=out)
            elif stage == "pairs":
                info = run_pairs(study, store, stream=out, pool_size=max(1, cpus // 2))
            else:
                info = run_tests(study, store, stream=out)
            info["seconds"] = round(time.perf_counter() - t0, 2)
            done[stage] = info
            worked = any(v for k, v in info.items() if k not in ("skipped", "seconds"))
            if _stage_complete(study, store, stage) and (worked or stage not in store.stages()):
                store.mark_stage(stage, **info)
    finally:
        if started:
            ray.shutdown()
    table = summary_table(store, study)
    seconds = time.perf_counter() - start
    print(format_summary(table), file=out)
    print(f"distsim: done in {seconds:.1f} s (store {store.root})", file=out, flush=True)
    return {"store": str(store.root), "outcome": outcome, "stages": done, "seconds": seconds,
            "nodes": nodes, "summary": table}


def pending_work(study: Study, store: Store, stages: tuple[str, ...]) -> dict[str, int]:
    """Units of work each stage would do now (trials, packs, tiles, tests), read from the store.

    A stage downstream of unfinished work counts as pending (1) without looking further.
    """
    from distsim.pipeline.features import pending_feature_packs
    from distsim.pipeline.pairs import pending_tiles, study_groups
    from distsim.pipeline.tests import study_protocols
    from distsim.pipeline.zoo import pending_packs

    out: dict[str, int] = {}
    upstream = False
    for stage in STAGES:
        if upstream:
            out[stage] = 1
            continue
        if stage == "zoo":
            n = len(pending_packs(study, store))
        elif stage == "features":
            n = len(pending_feature_packs(study, store))
        elif stage == "pairs":
            counts = {
                (a, m, lay): c for a, m, lay, c in
                store.scan("features").group_by("arch", "method", "layer").agg(pl.len()).collect().iter_rows()
            }
            n = sum(
                len(pending_tiles(store, g, counts.get((g.arch, g.method, g.layer), 0), study.pairs.block)[0])
                or int(counts.get((g.arch, g.method, g.layer), 0) == 0)
                for g in study_groups(study)
            )
        else:
            have = {tuple(k[c] for c in ("arch", "method", "layer", "protocol")) for k in store.shard_keys("tests")}
            n = sum((g.arch, g.method, g.layer, p) not in have
                    for g in study_groups(study) for p in study_protocols(study))
        out[stage] = n
        upstream = upstream or n > 0
    return {s: out[s] for s in stages}


def _stage_complete(study: Study, store: Store, stage: str) -> bool:
    """True when the store holds every output of `stage` (failed zoo packs leave it open)."""
    if stage == "zoo":
        from distsim.pipeline.zoo import pending_packs

        return not pending_packs(study, store)
    if stage == "features":
        from distsim.pipeline.features import pending_feature_packs

        return not pending_feature_packs(study, store)
    return True
