"""Rewrite an unreadable study.json from the study file, when the store's tables are that study's.

A store whose study.json is lost or corrupt still holds whole tables, but a launch cannot tell
which study they belong to. ``distsim launch STUDY.toml`` rewrites study.json from STUDY.toml
when every stored shard matches that study (:func:`mismatch` finds none):

- every models row is a model of one of the study's packs (arch, task, pack, and for a
  trained study the seed), trained for the study's ``epochs`` of its arch (ok models);
- every arch's stored weights have the tensor names and shapes of the study's model of that
  arch (a changed width or depth shows here; a trained study's);
- every features, pairs, neighbors and tests shard is of one of the study's feature
  matrices (arch, method, layer, saved epoch), every test of one of its protocols.

What the tables cannot show (a learning rate, an optimizer, a test's permutation count) is
taken on the study file's word: the note the launch prints says so.
"""

from __future__ import annotations

from typing import TextIO

import polars as pl

from distsim.config import Study
from distsim.errors import StoreError
from distsim.store import Store


def mismatch(study: Study, store: Store) -> str | None:
    """The first way the store's tables are not `study`'s, or None when all match."""
    from distsim.pipeline.zoo import zoo_packs

    packs = {(p.arch, p.task, p.pack): set(p.seeds) for p in zoo_packs(study, store)}
    models = store.scan("models").select("model_id", "arch", "task", "pack", "seed", "status",
                                         "epochs", "epoch").collect()
    for mid, arch, task, pack, seed, status, epochs, epoch in models.iter_rows():
        seeds = packs.get((arch, task, pack))
        if seeds is None:
            return f"model {mid} is of pack {arch}-t{task}-p{pack}, which the study does not have"
        if study.imports:
            continue
        if seed not in seeds:
            return f"model {mid} has seed {seed}, which pack {arch}-t{task}-p{pack} does not train"
        want = study.train_config(arch).epochs
        if status == "ok" and epoch in (None, want) and epochs != want:
            return f"model {mid} was trained for {epochs} epochs, the study trains {want}"
    if not study.imports:
        problem = _weights_mismatch(study, store, models)
        if problem:
            return problem
    matrices = {(m.arch, m.method, m.layer) for m in study.matrices()}
    epochs = {(m.arch, m.method, m.layer, m.epoch) for m in study.matrices()}
    for table in ("features", "pairs", "neighbors", "tests"):
        for key in store.shard_keys(table):
            if (key["arch"], key["method"], key["layer"]) not in matrices:
                return (f"{table} of {key['arch']}/{key['method']}/{key['layer']}, which is not "
                        "a feature matrix of the study")
            if table != "features" and (key["arch"], key["method"], key["layer"],
                                        key.get("epoch")) not in epochs:
                return f"{table} of epoch {key.get('epoch')}, which the study does not save"
    from distsim.pipeline.groups import study_tests

    if study.tests.factors is None:
        protocols = {p for p, _ in study_tests(study, None)}
        for key in store.shard_keys("tests"):
            if key["protocol"] not in protocols:
                return f"a test of protocol {key['protocol']}, which the study does not run"
    return None


def restore_study(study: Study, store: Store, problem: str, out: TextIO) -> None:
    """Rewrite the unreadable study.json of `store` from `study` when its tables match it
    (one line says so), else StoreError naming `problem` and the first mismatch."""
    found = mismatch(study, store)
    if found is not None:
        raise StoreError(f"{problem}; it cannot be rewritten from {study.source}: {found}; "
                         "launch with --fresh to start over, or restore study.json from a copy")
    store.bind(study, "created")
    n = store.scan("models").select(pl.len()).collect().item()
    print(f"distsim: study.json was unreadable; rewritten from {study.source} (its {n} models "
          "and every stored shard match that study; what the tables cannot show, e.g. the "
          "learning rate, is taken from the file)", file=out, flush=True)


def _weights_mismatch(study: Study, store: Store, models: pl.DataFrame) -> str | None:
    """The first arch whose stored weights differ in names or shapes from the study's model."""
    import torch

    from distsim.pipeline.zoo import pack_arch
    from distsim.zoo.models import build

    for arch in study.arch_names:
        mine = models.filter((pl.col("arch") == arch) & (pl.col("status") == "ok"))
        if mine.height == 0:
            continue
        mid, task = mine["model_id"][0], int(mine["task"][0])
        stored = store.read_state_dicts([mid])[mid]
        with torch.device("meta"):
            model = build(pack_arch(study, arch, task))
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in stored.items()}
        if have != want:
            diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
            return (f"the weights of {mid} are not those of the study's {arch} (tensor "
                    f"{diff[0]}: stored {have.get(diff[0])}, study {want.get(diff[0])})")
    return None
