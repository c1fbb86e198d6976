"""A store whose study.json is unreadable: query, report, verify and distsim.open still read its
tables (saying the config is unknown); launch and status refuse, saying how to restore it; a
launch of the store's own study rewrites it, a launch of another study does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _study import FINISHED_STUDY, study_toml
from typer.testing import CliRunner

import distsim
from distsim.cli import app
from distsim.config import load_study
from distsim.errors import StoreError
from distsim.store import Store

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
BROKEN = '{"hash": "3f2a'  # a study.json cut short, as a full disk or a crash leaves one


@pytest.fixture
def broken(finished_study: Path, tmp_path: Path) -> tuple[Store, str]:
    """A copy of the session's finished store with its study.json cut short, and the
    study.json it had."""
    root = tmp_path / "store"
    shutil.copytree(finished_study.parent / "store", root)
    good = (root / "study.json").read_text()
    (root / "study.json").write_text(BROKEN)
    return Store(root), good


def _cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_query_report_and_the_python_api_read_the_tables(broken: tuple[Store, str],
                                                        tmp_path: Path) -> None:
    store, _ = broken
    code, out, err = _cli("query", "models", store.root, "--limit", "0", "--format", "csv")
    assert code == 0 and len(out.splitlines()) == 1 + 36  # 3 archs x 4 tasks x 3 seeds
    assert err.startswith("distsim: the study's config is unknown (") and "unreadable" in err
    code, out, _ = _cli("query", "tests", store.root, "--limit", "0", "--format", "csv")
    assert code == 0 and len(out.splitlines()) > 1
    code, out, _ = _cli("report", store.root, "--out", tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert code == 0 and "config</td><td>unknown (" in page and "fig-mlp-raw-features.png" in page
    with pytest.warns(UserWarning, match="the study's config is unknown"):
        res = distsim.open(store.root)
    assert res.models().height == 36 and res.tests().height > 0
    ids, _, X = res.features("mlp", "out", "chain-gram")
    assert len(ids) == 12 and X.shape[0] == 12
    assert repr(res).startswith("Results(config unknown: 36 models, archs cnn, mlp, rnn;")
    with pytest.raises(StoreError, match="the study's config is unknown: .* unreadable "
                                         "study.json .* `distsim launch STUDY.toml` rewrites it"):
        res.task(0)


def test_verify_checks_the_tables_and_says_how_to_restore(broken: tuple[Store, str]) -> None:
    store, _ = broken
    code, out, _ = _cli("verify", store.root)
    lines = out.splitlines()
    assert code == 1 and lines[0].startswith("study.json: not valid JSON (")
    assert "`distsim launch STUDY.toml` rewrites it" in lines[0] and len(lines) == 1  # tables ok


def test_status_and_a_launch_of_another_study_refuse_and_change_nothing(
        broken: tuple[Store, str], tmp_path: Path) -> None:
    store, _ = broken
    code, _, err = _cli("status", store.root)
    assert code == 2 and "unreadable study.json" in err and "rewrites it when every" in err
    other = tmp_path / "other.toml"  # the mlp one unit wider: its stored weights tell
    arch = [dict(a) for a in FINISHED_STUDY["arch"]]
    arch[0]["widths"] = [7, 5]
    other.write_text(study_toml(FINISHED_STUDY, study={"store": str(store.root)}, arch=arch))
    code, _, err = _cli("launch", other)
    assert code == 2, err
    assert "it cannot be rewritten from " in err and "tensor 1.bias: stored (6,), study (7,)" in err
    assert (store.root / "study.json").read_text() == BROKEN


def test_a_launch_of_its_own_study_rewrites_study_json(broken: tuple[Store, str],
                                                       tmp_path: Path) -> None:
    store, good = broken
    own = tmp_path / "own.toml"
    own.write_text(study_toml(FINISHED_STUDY, study={"store": str(store.root)}))
    code, _, err = _cli("launch", own)
    assert code == 0, err
    assert "study.json was unreadable; rewritten from " in err and "nothing to run" in err
    assert json.loads((store.root / "study.json").read_text())["hash"] == json.loads(good)["hash"]
    assert load_study(own).hash == json.loads(good)["hash"]
    code, out, _ = _cli("status", store.root)
    assert code == 0 and "tests     complete" in out
