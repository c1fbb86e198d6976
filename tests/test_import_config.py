"""The [zoo] section of a study file: import studies validate, trained ones keep their hashes."""

from __future__ import annotations

import pytest
from _study import study_toml

from distsim.config import ConfigError, parse_study, study_from_dict

IMPORT = {
    "study": {"name": "imp", "store": "store"},
    "zoo": {"source": "import", "format": "model-zoos", "path": "zoo"},
    "arch": [{"kind": "cnn", "channels": [4, 8], "activation": "tanh", "input_shape": [1, 8, 8],
              "num_classes": 2}],
}


def _parse(**sections: object):
    return parse_study(study_toml(IMPORT, train=None, data=None, **sections), base_dir="/data")


def test_an_import_study_declares_its_arch_and_resolves_its_path() -> None:
    study = _parse()
    assert study.imports and study.train is None and study.data is None
    assert study.zoo.path == "/data/zoo" and study.zoo.epochs == "last"
    assert study.archs[0].input_shape == (1, 8, 8) and study.archs[0].num_classes == 2
    again = study_from_dict(study.resolved(), source="<string>")
    assert again == study and again.hash == study.hash


def test_a_trained_study_has_no_zoo_in_its_resolved_config() -> None:
    study = parse_study(study_toml())
    assert not study.imports and "zoo" not in study.resolved()
    assert parse_study(study_toml(zoo={"source": "train"})).hash == study.hash
    grouped = parse_study(study_toml(tests={"group_by": "seed"}))
    assert grouped.hash != study.hash and grouped.tests.group_by == "seed"


@pytest.mark.parametrize(("sections", "message"), [
    ({"zoo": {"format": "torchvision"}}, "zoo.format: must be one of"),
    ({"zoo": {"path": None}}, "zoo.path: missing required key"),
    ({"zoo": {"epochs": "first"}}, 'zoo.epochs: must be "last", "all" or a non-empty list'),
    ({"zoo": {"labels": "folder"}}, 'zoo.labels: applies only to format = "state-dicts"'),
    ({"train": {"seeds_per_task": 3}}, "train: an import study (zoo.source = \"import\") trains"),
    ({"arch": [{"kind": "mlp", "input_shape": [1, 8, 8]}]}, "arch[0].num_classes: missing"),
    ({"arch": [{"kind": "mlp", "input_shape": [1, 8, 8], "num_classes": 2}] * 2},
     "arch: an import study reads one architecture"),
    ({"features": {"methods": ["cka"]}}, "features.methods: 'cka' needs inputs"),
    ({"data": {"dataset": "digits", "num_tasks": 2}, "arch": [
        {"kind": "mlp", "input_shape": [1, 4, 4], "num_classes": 2}]},
     "arch[0].input_shape: [1, 4, 4] does not fit the samples of [data] ([1, 8, 8])"),
    ({"tests": {"group_bins": [1.0, 0.5]}}, "tests.group_bins: edges must increase"),
])
def test_bad_import_studies_are_one_line_errors(sections: dict, message: str) -> None:
    base = {**IMPORT, **{k: v for k, v in sections.items() if k in ("arch",)}}
    merged = {k: v for k, v in sections.items() if k != "arch"}
    if "zoo" in merged:
        merged["zoo"] = {**IMPORT["zoo"], **merged["zoo"]}
    text = study_toml(base, **{"train": None, "data": None, **merged})
    with pytest.raises(ConfigError) as err:
        parse_study(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_trained_study_refuses_import_keys() -> None:
    with pytest.raises(ConfigError, match='zoo.path: applies only to zoo.source = "import"'):
        parse_study(study_toml(zoo={"path": "x"}))
