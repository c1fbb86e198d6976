"""Study files: every job validates, every kind of bad input is one ConfigError line naming
its key, the hash is stable, packs cover the seeds exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.config import ConfigError, Study, load_study, parse_study, study_from_dict
from distsim.models import ArchConfig
from distsim.tasks import DataConfig
from distsim.train import TrainConfig

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.toml"))

SMALL = """
[study]
name = "small"
seed = 1
store = "stores/small"

[data]
dataset = "synthetic"
num_tasks = 3

[[arch]]
kind = "mlp"
widths = [8]

[[arch]]
name = "gru"
kind = "rnn"
hidden = 4

[train]
seeds_per_task = 5
seeds_per_trial = 2
epochs = 2
lr = 0.1

[train.gru]
epochs = 3

[resources]
cpus_per_trial = 0.5
gpus_per_trial = 0.25

[features]
methods = ["chain-gram"]
layers = "last"

[tests]
permutations = 9
"""


def small(**replace: str) -> str:
    text = SMALL
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


# ----------------------------------------------------------------------------- the job files


def test_jobs_folder_has_the_three_studies():
    assert {p.name for p in JOBS} >= {"quickstart.toml", "paper.toml", "cifar100-gpu.toml"}


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_validates(path):
    study = load_study(path)
    assert isinstance(study, Study)
    assert {a.kind for a in study.archs} == {"mlp", "cnn", "rnn"}
    for name in study.arch_names:
        assert isinstance(study.train_config(name), TrainConfig)
        assert study.feature_layers(name)
    n_models = study.data.num_tasks * study.train.seeds_per_task
    assert sum(len(p.seeds) for p in study.packs()) == n_models * len(study.archs)


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
    study = parse_study(SMALL, base_dir=tmp_path)
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

    study = parse_study(SMALL)
    again = pickle.loads(pickle.dumps(study))
    assert again == study and hash(again) == hash(study) and again.hash == study.hash
    with pytest.raises(dataclasses.FrozenInstanceError):
        study.seed = 3


def test_packs_cover_every_seed_once_with_distinct_seeds_across_tasks():
    study = parse_study(SMALL)
    packs = study.packs("mlp")
    assert [len(p.seeds) for p in packs] == [2, 2, 1] * 3
    assert packs[0].trial_id == "arch=mlp/task=0/pack=0"
    seeds = [s for p in packs for s in p.seeds]
    assert len(seeds) == len(set(seeds)) == 15
    assert study.model_seeds(1) == tuple(s for p in packs if p.task == 1 for s in p.seeds)
    assert [p.seeds for p in study.packs("gru")] == [p.seeds for p in packs]  # same seeds per arch


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), pack=st.integers(1, 40), tasks=st.integers(1, 6), seed=st.integers(0, 50))
def test_packs_partition_the_seeds(n, pack, tasks, seed):
    text = small(**{"seeds_per_task = 5": f"seeds_per_task = {n}", "seeds_per_trial = 2": f"seeds_per_trial = {min(pack, n)}",
                    "num_tasks = 3": f"num_tasks = {tasks}", "seed = 1": f"seed = {seed}"})
    study = parse_study(text.replace('layers = "last"', 'layers = "all"'))
    for t in range(tasks):
        got = [s for p in study.packs("mlp") if p.task == t for s in p.seeds]
        assert got == list(study.model_seeds(t)) and len(got) == n
    all_seeds = [s for p in study.packs("mlp") for s in p.seeds]
    assert len(set(all_seeds)) == n * tasks


# ----------------------------------------------------------------------------- hash


def test_hash_is_sha256_of_the_resolved_config_without_store_and_resources():
    study = parse_study(SMALL)
    d = study.resolved()
    json.dumps(d, allow_nan=False)  # plain JSON types
    d["study"].pop("store")
    d.pop("resources")
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    assert study.hash == hashlib.sha256(blob.encode()).hexdigest()


def test_hash_is_stable_and_sees_what_matters(tmp_path):
    h = parse_study(SMALL).hash
    assert parse_study(SMALL).hash == h
    # spelling that does not change the study: defaults written out, another store
    # folder, other resources, reordered sections
    same = [
        small(**{"lr = 0.1": "lr = 0.1\nmomentum = 0.9"}),
        small(**{'store = "stores/small"': 'store = "/elsewhere/small"'}),
        small(**{"gpus_per_trial = 0.25": "gpus_per_trial = 1"}),
        small(**{"lr = 0.1": "lr = 1e-1"}),
        small(**{'layers = "last"': 'layers = "last"\nsketch = "output"'}),
    ]
    for text in same:
        assert parse_study(text, base_dir=tmp_path).hash == h
    reordered = SMALL.split("[train]")
    assert parse_study("[train]" + reordered[1] + reordered[0]).hash == h
    changed = [
        small(**{"epochs = 2": "epochs = 4"}),
        small(**{"epochs = 3": "epochs = 4"}),
        small(**{"seeds_per_task = 5": "seeds_per_task = 6"}),
        small(**{"permutations = 9": "permutations = 19"}),
        small(**{'name = "small"': 'name = "other"'}),
        small(**{'layers = "last"': 'layers = "last"\ndim = 16'}),
        small(**{'layers = "last"': 'layers = "last"\ndim = 16\nsketch = "input"'}),
    ]
    assert len({parse_study(t).hash for t in changed} | {h}) == len(changed) + 1


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_resolved_round_trips_to_the_same_study(path):
    study = load_study(path)
    again = study_from_dict(json.loads(json.dumps(study.resolved())))
    assert again.resolved() == study.resolved() and again.hash == study.hash


def test_default_top_k_shrinks_to_a_tiny_zoo():
    study = parse_study(small(**{"num_tasks = 3": "num_tasks = 1", "seeds_per_task = 5": "seeds_per_task = 4"}))
    assert study.pairs.top_k == 3


def test_npz_path_resolves_against_the_study_folder(tmp_path):
    study = parse_study(small(**{'dataset = "synthetic"': 'dataset = "npz"\npath = "data/x.npz"'}), base_dir=tmp_path)
    assert study.data.path == str(tmp_path / "data" / "x.npz")
    assert study.arch("mlp").input_shape == ArchConfig().input_shape  # the npz's shape is known at launch


def test_store_uri_is_kept_and_absolute_path_untouched(tmp_path):
    assert parse_study(small(**{'store = "stores/small"': 'store = "s3://bucket/x"'})).store == "s3://bucket/x"
    assert parse_study(small(**{'store = "stores/small"': f'store = "{tmp_path}"'})).store == str(tmp_path)


# ----------------------------------------------------------------------------- bad input

BAD = [
    # (replacement in SMALL, key path, words the message must hold)
    ({"seeds_per_trial = 2": "seeds_per_trial = 9"}, "train.seeds_per_trial", "[1, 5]"),
    ({"seeds_per_trial = 2": "seeds_per_trial = 0"}, "train.seeds_per_trial", "[1, inf)"),
    ({"seeds_per_task = 5": "seeds_per_task = 1"}, "train.seeds_per_task", "[2, inf)"),
    ({"seeds_per_task = 5\n": ""}, "train.seeds_per_task", "missing required key"),
    ({"epochs = 2": "epoch = 2"}, "train.epoch", "unknown key; allowed:"),
    ({"epochs = 2": "epochs = 0"}, "train.epochs", "[1, inf)"),
    ({"epochs = 2": "epochs = 2.5"}, "train.epochs", "must be an integer"),
    ({"epochs = 2": 'epochs = "two"'}, "train.epochs", "must be an integer"),
    ({"lr = 0.1": "lr = -0.1"}, "train.lr", "(0.0, inf)"),
    ({"lr = 0.1": 'optimizer = "rmsprop"'}, "train.optimizer", "sgd"),
    ({"epochs = 3": "epochz = 3"}, "train.gru.epochz", "unknown key"),
    ({"[train.gru]": "[train.lstm]"}, "train.lstm", "arch name"),
    ({'kind = "mlp"': 'kind = "vit"'}, "arch[0].kind", "mlp"),
    ({"widths = [8]": "widths = [8, 0]"}, "arch[0].widths", "positive"),
    ({"widths = [8]": 'widths = [8, "x"]'}, "arch[0].widths[1]", "integer"),
    ({"widths = [8]": "widths = 8"}, "arch[0].widths", "array of integers"),
    ({'name = "gru"': 'name = "mlp"'}, "arch[1].name", "unique"),
    ({'name = "gru"': 'name = "g r u"'}, "arch[1].name", "[A-Za-z0-9_.-]+"),
    ({"[[arch]]\nkind = \"mlp\"": "[[arch]]\nwidths2 = 1"}, "arch[0].widths2", "unknown key"),
    ({'dataset = "synthetic"': 'dataset = "mnist"'}, "data.dataset", "digits"),
    ({"num_tasks = 3": "num_tasks = 0"}, "data.num_tasks", "[1, inf)"),
    ({'dataset = "synthetic"': 'dataset = "npz"'}, "data.path", ".npz"),
    ({'dataset = "synthetic"': 'dataset = "digits"\npath = "x.npz"'}, "data.path", "npz"),
    ({'name = "small"': "name = 3"}, "study.name", "must be a string"),
    ({'name = "small"\n': ""}, "study.name", "missing required key"),
    ({"seed = 1": "seed = -1"}, "study.seed", "[0, inf)"),
    ({"seed = 1": "seed = true"}, "study.seed", "must be an integer"),
    ({"cpus_per_trial = 0.5": "cpus_per_trial = 0"}, "resources.cpus_per_trial", "(0.0, inf)"),
    ({"gpus_per_trial = 0.25": "gpus_per_trial = 1.5"}, "resources.gpus_per_trial", "whole number"),
    ({"gpus_per_trial = 0.25": "gpus_per_trial = -1"}, "resources.gpus_per_trial", "[0.0, inf)"),
    ({"cpus_per_trial = 0.5": "cpu = 1"}, "resources.cpu", "unknown key"),
    ({'methods = ["chain-gram"]': 'methods = ["gram"]'}, "features.methods", "chain-gram, raw"),
    ({'layers = "last"': 'layers = "first"'}, "features.layers", '"all", "last"'),
    ({'layers = "last"': 'layers = ["fc9"]'}, "features.layers", "not a layer"),
    ({'layers = "last"': 'sketch = "both"'}, "features.sketch", "output, input"),
    ({'layers = "last"': 'sketch = "input"'}, "features.sketch", "needs features.dim"),
    ({"permutations = 9": "permutations = 0"}, "tests.permutations", "[1, inf)"),
    ({"permutations = 9": 'protocols = ["closed"]'}, "tests.protocols", "closed-set, open-set"),
    ({"permutations = 9": 'learner = "svm"'}, "tests.learner", "lda, softmax"),
    ({"permutations = 9": "train_fraction = 1.0"}, "tests.train_fraction", "(0, 1)"),
    ({"[tests]": "[tests]\n[pairs]\ntop_k = 15\n[extra]"}, "extra", "unknown key; allowed: arch"),
    ({"[tests]\npermutations = 9": "[pairs]\ntop_k = 15"}, "pairs.top_k", "< the number of models"),
    ({"[tests]\npermutations = 9": "[pairs]\nmetric = \"l1\""}, "pairs.metric", "euclidean, cosine"),
    ({"[study]": "resources = 3\n[study]", "[resources]\ncpus_per_trial = 0.5\ngpus_per_trial = 0.25": ""},
     "resources", "must be a table"),
]


@pytest.mark.parametrize("replace,key,words", BAD, ids=[b[1] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_one_line_naming_the_key(replace, key, words):
    with pytest.raises(ConfigError) as info:
        parse_study(small(**replace))
    msg = str(info.value)
    assert info.value.key == key
    assert msg.startswith(f"{key}:"), msg
    assert words in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("section", ["study", "data", "arch", "train"])
def test_missing_required_section(section):
    text = "\n".join(
        block for block in SMALL.split("\n\n") if not block.strip().startswith(("[" + section + "]", "[[" + section + "]]", "[" + section + "."))
    )
    with pytest.raises(ConfigError, match=rf"^{section}: missing section"):
        parse_study(text)


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
