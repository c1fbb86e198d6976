"""Study files: every job validates, every kind of bad input is one ConfigError line naming
its key, the hash is stable, packs cover the seeds exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from _study import study_toml
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.config import ConfigError, Study, load_study, parse_study, study_from_dict
from distsim.config.arch import ArchConfig
from distsim.config.data import DataConfig
from distsim.config.training import TrainConfig

ALL_JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.toml"))
JOBS = [p for p in ALL_JOBS if not p.name.startswith("import-")]  # trained studies
IMPORT_JOBS = [p for p in ALL_JOBS if p.name.startswith("import-")]

MLP = {"kind": "mlp", "widths": [8]}
GRU = {"name": "gru", "kind": "rnn", "hidden": 4}
# The whole study (not overrides of the builder's default): small(...) = study_toml(SMALL, ...).
SMALL = {
    "study": {"name": "small", "seed": 1, "store": "stores/small"},
    "data": {"dataset": "synthetic", "num_tasks": 3},
    "arch": [MLP, GRU],
    "train": {"seeds_per_task": 5, "seeds_per_trial": 2, "epochs": 2, "lr": 0.1,
              "gru": {"epochs": 3}},
    "resources": {"cpus_per_trial": 0.5, "gpus_per_trial": 0.25},
    "features": {"methods": ["chain-gram"], "layers": "last"},
    "tests": {"permutations": 9},
}


def small(**sections) -> str:
    """SMALL's text with `sections` merged in (a dict), replacing (a list or scalar) or removing
    (None) sections: see tests/_study.py."""
    return study_toml(SMALL, **sections)


def respelled(old: str, new: str) -> str:
    """SMALL's text with one spelling changed, for what a dict cannot say (`1e-1` for `0.1`)."""
    text = small()
    assert text.count(old) == 1, (old, text)
    return text.replace(old, new)


# ----------------------------------------------------------------------------- the job files


def test_jobs_folder_has_the_three_studies():
    assert {p.name for p in JOBS} >= {"quickstart.toml", "paper.toml", "cifar100-gpu.toml"}


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_validates(path):
    study = load_study(path)
    assert isinstance(study, Study)
    kinds = {a.kind for a in study.archs}
    if path.name.startswith(("resnet-", "transformer-")):  # a study of that architecture
        assert kinds == {path.name.split("-")[0]}
    else:  # the paper's architectures
        assert kinds >= {"mlp", "cnn"}
    for name in study.arch_names:
        assert isinstance(study.train_config(name), TrainConfig)
        assert study.feature_layers(name)
    n_models = study.data.num_tasks * study.train.seeds_per_task * len(study.cells())
    assert sum(len(p.seeds) for p in study.packs()) == n_models * len(study.archs)


@pytest.mark.parametrize("path", IMPORT_JOBS, ids=[p.name for p in IMPORT_JOBS])
def test_every_import_job_declares_one_arch_and_no_training(path):
    study = load_study(path)
    assert study.imports and study.train is None and len(study.archs) == 1
    assert study.zoo.format in path.name or (study.zoo.format == "distsim-export"
                                             and "export" in path.name)


def test_quickstart_is_small_and_cifar_follows_the_paper():
    quick = load_study(JOBS[0].parent / "quickstart.toml")
    assert quick.data.dataset == "digits" and quick.train.packs_per_task == 1
    assert quick.data.num_tasks * quick.train.seeds_per_task <= 200
    gpu = load_study(JOBS[0].parent / "cifar100-gpu.toml")
    assert (gpu.data.dataset, gpu.data.num_tasks, gpu.data.pairing) == ("npz", 50, "consecutive")
    assert gpu.train.seeds_per_task == 100
    assert 0 < gpu.resources.gpus_per_trial < 1
    cfg = gpu.train_config("cnn")
    assert (cfg.lr, cfg.momentum, cfg.batch_size, cfg.epochs, cfg.milestones, cfg.gamma) == (
        0.1, 0.9, 128, 50, (30,), 0.1)


# ----------------------------------------------------------------------------- typed result


def test_small_study_maps_onto_the_module_dataclasses(tmp_path):
    study = parse_study(small(), base_dir=tmp_path)
    assert study.store == str((tmp_path / "stores" / "small").resolve())
    assert isinstance(study.data, DataConfig) and study.data.seed == 1  # defaults to study.seed
    assert study.arch_names == ("mlp", "gru")
    assert isinstance(study.arch("gru"), ArchConfig) and study.arch("gru").hidden == 4
    assert study.train_config("mlp").epochs == 2 and study.train_config("gru").epochs == 3
    assert study.train_config("gru").lr == 0.1  # base value kept under an override
    assert study.resources.gpus_per_trial == 0.25
    assert study.feature_layers("mlp") == ("out",)
    assert study.tests.permutations == 9 and study.tests.seed == 1
    with pytest.raises(KeyError):
        study.arch("cnn")


def test_study_is_frozen_hashable_and_pickles():
    import dataclasses
    import pickle

    study = parse_study(small())
    again = pickle.loads(pickle.dumps(study))
    assert again == study and hash(again) == hash(study) and again.hash == study.hash
    with pytest.raises(dataclasses.FrozenInstanceError):
        study.seed = 3


def test_packs_cover_every_seed_once_with_distinct_seeds_across_tasks():
    study = parse_study(small())
    packs = study.packs("mlp")
    assert [len(p.seeds) for p in packs] == [2, 2, 1] * 3
    assert packs[0].trial_id == "arch=mlp/task=0/pack=0"
    seeds = [s for p in packs for s in p.seeds]
    assert len(seeds) == len(set(seeds)) == 15
    assert study.model_seeds(1) == tuple(s for p in packs if p.task == 1 for s in p.seeds)
    assert [p.seeds for p in study.packs("gru")] == [p.seeds for p in packs]  # same seeds per arch


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 40), pack=st.integers(1, 40), tasks=st.integers(1, 6), seed=st.integers(0, 50)
)
def test_packs_partition_the_seeds(n, pack, tasks, seed):
    study = parse_study(small(
        study={"seed": seed},
        data={"num_tasks": tasks},
        train={"seeds_per_task": n, "seeds_per_trial": min(pack, n)},
        features={"layers": "all"},
    ))
    for t in range(tasks):
        got = [s for p in study.packs("mlp") if p.task == t for s in p.seeds]
        assert got == list(study.model_seeds(t)) and len(got) == n
    all_seeds = [s for p in study.packs("mlp") for s in p.seeds]
    assert len(set(all_seeds)) == n * tasks


# ----------------------------------------------------------------------------- hash


def test_hash_is_sha256_of_the_resolved_config_without_store_and_resources():
    study = parse_study(small())
    d = study.resolved()
    json.dumps(d, allow_nan=False)  # plain JSON types
    d["study"].pop("store")
    d.pop("resources")
    d["tests"].pop("backend"), d["pairs"].pop("backend")  # where it runs: not hashed
    d["features"].pop("projection")  # no dim: no projection (tests/test_sketch.py)
    for key in ("probe_size", "template_models", "template_iterations"):  # no cka, no aligned
        d["features"].pop(key)
    if any(a["kind"] == "rnn" for a in d["arch"]):
        d["features"]["gru_features"] = 2
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    assert study.hash == hashlib.sha256(blob.encode()).hexdigest()


def test_method_options_enter_the_hash_only_with_their_method():
    """probe_size changes what cka computes, template_* what aligned computes: hashed only when
    the method runs, so studies without them keep their hash."""
    def hash_of(**features):
        return parse_study(small(features={"methods": ["chain-gram"], **features})).hash

    assert hash_of(probe_size=64, template_models=9) == hash_of()
    assert hash_of(methods=["cka"], probe_size=64) != hash_of(methods=["cka"])
    assert hash_of(methods=["aligned"], template_iterations=1) != hash_of(methods=["aligned"])


def test_hash_is_stable_and_sees_what_matters(tmp_path):
    h = parse_study(small()).hash
    assert parse_study(small()).hash == h
    # spelling that does not change the study: defaults written out, another store
    # folder, other resources, reordered sections
    same = [
        small(train={"momentum": 0.9}),
        small(study={"store": "/elsewhere/small"}),
        small(resources={"gpus_per_trial": 1}),
        respelled("lr = 0.1", "lr = 1e-1"),
        small(features={"sketch": "output"}),
    ]
    for text in same:
        assert parse_study(text, base_dir=tmp_path).hash == h
    reordered = study_toml({name: SMALL[name] for name in reversed(SMALL)})
    assert reordered.index("[tests]") < reordered.index("[study]")
    assert parse_study(reordered).hash == h
    changed = [
        small(train={"epochs": 4}),
        small(train={"gru": {"epochs": 4}}),
        small(train={"seeds_per_task": 6}),
        small(tests={"permutations": 19}),
        small(study={"name": "other"}),
        small(features={"dim": 16}),
        small(features={"dim": 16, "sketch": "input"}),
    ]
    assert len({parse_study(t).hash for t in changed} | {h}) == len(changed) + 1


@pytest.mark.parametrize("path", ALL_JOBS, ids=[p.name for p in ALL_JOBS])
def test_resolved_round_trips_to_the_same_study(path):
    study = load_study(path)
    again = study_from_dict(json.loads(json.dumps(study.resolved())))
    assert again.resolved() == study.resolved() and again.hash == study.hash


def test_default_top_k_shrinks_to_a_tiny_zoo():
    study = parse_study(small(data={"num_tasks": 1}, train={"seeds_per_task": 4}))
    assert study.pairs.top_k == 3


def test_npz_path_resolves_against_the_study_folder(tmp_path):
    text = small(data={"dataset": "npz", "path": "data/x.npz"})
    study = parse_study(text, base_dir=tmp_path)
    assert study.data.path == str(tmp_path / "data" / "x.npz")
    # the npz's shape is known at launch
    assert study.arch("mlp").input_shape == ArchConfig().input_shape


def test_store_uri_is_kept_and_absolute_path_untouched(tmp_path):
    assert parse_study(small(study={"store": "s3://bucket/x"})).store == "s3://bucket/x"
    assert parse_study(small(study={"store": str(tmp_path)})).store == str(tmp_path)


# ----------------------------------------------------------------------------- bad input

BAD = [
    # (sections for small(): a dict merges into SMALL's section, a key or section set to None
    #  is removed, a list or scalar replaces the section; key path; words the message must hold)
    ({"train": {"seeds_per_trial": 9}}, "train.seeds_per_trial", "[1, 5]"),
    ({"train": {"seeds_per_trial": 0}}, "train.seeds_per_trial", "[1, inf)"),
    ({"train": {"seeds_per_task": 1}}, "train.seeds_per_task", "[2, inf)"),
    ({"train": {"seeds_per_task": None}}, "train.seeds_per_task", "missing required key"),
    ({"train": {"epochs": None, "epoch": 2}}, "train.epoch", "unknown key; allowed:"),
    ({"train": {"epochs": 0}}, "train.epochs", "[1, inf)"),
    ({"train": {"epochs": 2.5}}, "train.epochs", "must be an integer"),
    ({"train": {"epochs": "two"}}, "train.epochs", "must be an integer"),
    ({"train": {"lr": -0.1}}, "train.lr", "(0.0, inf)"),
    ({"train": {"lr": None, "optimizer": "rmsprop"}}, "train.optimizer", "sgd"),
    ({"train": {"gru": {"epochz": 3}}}, "train.gru.epochz", "unknown key"),
    ({"train": {"gru": None, "lstm": {"epochs": 3}}}, "train.lstm", "arch name"),
    ({"arch": [{**MLP, "kind": "vit"}, GRU]}, "arch[0].kind", "mlp"),
    ({"arch": [{**MLP, "widths": [8, 0]}, GRU]}, "arch[0].widths[1]", "[1, inf)"),
    ({"arch": [{**MLP, "widths": [8, "x"]}, GRU]}, "arch[0].widths[1]", "integer"),
    ({"arch": [{**MLP, "widths": 8}, GRU]}, "arch[0].widths", "array of integers"),
    ({"arch": [MLP, {**GRU, "name": "mlp"}]}, "arch[1].name", "unique"),
    ({"arch": [MLP, {**GRU, "name": "g r u"}]}, "arch[1].name", "[A-Za-z0-9_.-]+"),
    ({"arch": [{"widths2": 1, "widths": [8]}, GRU]}, "arch[0].widths2", "unknown key"),
    ({"data": {"dataset": "mnist"}}, "data.dataset", "digits"),
    ({"data": {"num_tasks": 0}}, "data.num_tasks", "[1, inf)"),
    ({"data": {"dataset": "npz"}}, "data.path", ".npz"),
    ({"data": {"dataset": "digits", "path": "x.npz"}}, "data.path", "npz"),
    ({"study": {"name": 3}}, "study.name", "must be a string"),
    ({"study": {"name": None}}, "study.name", "missing required key"),
    ({"study": {"seed": -1}}, "study.seed", "[0, inf)"),
    ({"study": {"seed": True}}, "study.seed", "must be an integer"),
    ({"resources": {"cpus_per_trial": 0}}, "resources.cpus_per_trial", "(0.0, inf)"),
    ({"resources": {"gpus_per_trial": 1.5}}, "resources.gpus_per_trial", "whole number"),
    ({"resources": {"gpus_per_trial": -1}}, "resources.gpus_per_trial", "[0.0, inf)"),
    ({"resources": {"cpus_per_trial": None, "cpu": 1}}, "resources.cpu", "unknown key"),
    ({"features": {"methods": ["grams"]}}, "features.methods[0]", "chain-gram, raw, gram"),
    ({"features": {"layers": "first"}}, "features.layers", '"all", "last"'),
    ({"features": {"layers": ["fc9"]}}, "features.layers", "not a layer"),
    ({"features": {"layers": None, "sketch": "both"}}, "features.sketch", "output, input"),
    ({"features": {"layers": None, "sketch": "input"}}, "features.sketch", "needs features.dim"),
    ({"tests": {"permutations": 0}}, "tests.permutations", "[1, inf)"),
    ({"tests": {"permutations": None, "protocols": ["closed"]}}, "tests.protocols[0]",
     "closed-set, open-set"),
    ({"tests": {"permutations": None, "learner": "svm"}}, "tests.learner", "lda, softmax"),
    ({"tests": {"permutations": None, "train_fraction": 1.0}}, "tests.train_fraction", "(0, 1)"),
    # an unknown section is named first (tests left empty, its key moved under [extra];
    #  top_k too big)
    ({"tests": {"permutations": None}, "pairs": {"top_k": 15}, "extra": {"permutations": 9}},
     "extra", "unknown key; allowed: arch"),
    ({"tests": None, "pairs": {"top_k": 15}}, "pairs.top_k", "< the number of models"),
    ({"tests": None, "pairs": {"metric": "l1"}}, "pairs.metric", "euclidean, cosine"),
    ({"resources": 3}, "resources", "must be a table"),  # a section written as a plain value
]


@pytest.mark.parametrize(
    "sections,key,words", BAD, ids=[b[1] + f"-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_is_one_line_naming_the_key(sections, key, words):
    with pytest.raises(ConfigError) as info:
        parse_study(small(**sections))
    msg = str(info.value)
    assert info.value.key == key
    assert msg.startswith(f"{key}:"), msg
    assert words in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("section", ["study", "data", "arch", "train"])
def test_missing_required_section(section):
    with pytest.raises(ConfigError, match=rf"^{section}: missing section"):
        parse_study(small(**{section: None}))  # train=None drops [train.gru] too


def test_bad_toml_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match=r"^invalid TOML: .*line 1"):
        parse_study("[study\nname = 1")
    with pytest.raises(ConfigError, match="no such study file"):
        load_study(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot read the study file"):
        load_study(tmp_path)  # a folder
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(ConfigError, match="cannot read the study file"):
        load_study(binary)


def test_shared_init_gives_model_i_of_every_task_one_init_seed():
    """train.shared_init: pack seeds stay distinct (ids, batch orders); init seeds repeat
    across tasks; the key enters the hash only when set; it needs 4 seeds per task."""
    plain = parse_study(small())
    shared = parse_study(small(train={"shared_init": True}))
    assert parse_study(small(train={"shared_init": False})).hash == plain.hash != shared.hash
    first, second = [p for p in shared.packs(shared.arch_names[0]) if p.pack == 0][:2]
    assert first.task != second.task and set(first.seeds).isdisjoint(second.seeds)
    assert shared.init_seeds(first) == shared.init_seeds(second)
    assert plain.init_seeds(first) == first.seeds
    assert list(shared.model_index(np.array(second.seeds), second.task)) == list(
        range(len(second.seeds)))
    with pytest.raises(ConfigError, match="train.shared_init: needs train.seeds_per_task >= 4"):
        parse_study(small(train={"shared_init": True, "seeds_per_task": 3, "seeds_per_trial": 3}))


def test_tests_section_builds_the_htt_options_the_stage_passes() -> None:
    """StatsSpec.htt_options(): the section's learner, split and k over HTTOptions' defaults
    (the section's defaults are HTTOptions'); the tests stage gives that one object to every
    unit of an HTT (fit, head, chunks), which then compute htt(..., options=...)."""
    from distsim.config import MatrixKey
    from distsim.config.sections import StatsSpec
    from distsim.pipeline.significance import HTTJob, MatrixRefs, htt_chunk, htt_fit, htt_head
    from distsim.stats import HTTOptions, htt, htt_null_chunk

    assert StatsSpec().htt_options() == HTTOptions(backend="auto")  # resolved on the worker
    study = parse_study(study_toml(tests={
        "learner": "softmax", "train_fraction": 0.5, "train_task_fraction": 0.7, "n_query": 2,
        "k": 1, "permutations": 9, "chunk_size": 4, "seed": 3}))
    options = study.tests.htt_options()
    assert options == HTTOptions(learner="softmax", train_fraction=0.5, train_task_fraction=0.7,
                                 n_query=2, k=1, backend="auto")

    class Remote:  # a stand-in for a Ray remote function: records its calls
        def __init__(self) -> None:
            self.calls: list[tuple[object, ...]] = []

        def remote(self, *args: object) -> str:
            self.calls.append(args)
            return f"ref{len(self.calls)}"

    fit_task = Remote()
    m = MatrixRefs(MatrixKey("mlp", "raw", "out"), "X", "tasks", 18, 3, "", Remote())
    job = HTTJob.plan(m, "closed-set", study.tests, options, None, fit_task)
    assert fit_task.calls == [("X", "tasks", "closed-set", 3, options, None)]
    assert [u.name for u in job.units] == [f"mlp-raw-out-closed-set-{c}" for c in range(3)]
    assert [u.fn for u in job.units] == [htt_head, htt_chunk, htt_chunk]
    assert all(u.args[-3:] == (options, None, "ref1") for u in job.units)
    assert job.learner == "softmax" and job.permutations == 9 and job.left == 3
    # the units, run here on data: the head is htt with these options, a chunk its null chunk
    rng = np.random.default_rng(0)
    tasks = np.repeat(np.arange(3), 6)
    X = rng.normal(size=(18, 5)) + 2 * np.eye(5)[tasks]
    data = {"X": X, "tasks": tasks, "ref1": htt_fit(X, tasks, "closed-set", 3, options, None)}
    head, chunk = (u.fn(*(data.get(a, a) if isinstance(a, str) else a for a in u.args))
                   for u in job.units[:2])
    want = htt(X, tasks, "closed-set", permutations=4, seed=3, options=options)
    assert head["observed"] == want.statistic and head["extra"]["learner"] == "softmax"
    assert head["extra"]["k"] == 1
    np.testing.assert_array_equal(head["null"], want.null)
    np.testing.assert_array_equal(chunk, htt_null_chunk(X, tasks, "closed-set", 4, (3, 1),
                                                        options=options, split_seed=3))
