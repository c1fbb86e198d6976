"""The distsim CLI: validate/launch argument handling, user errors (one line, exit 2), status,
and queries over a small synthetic store written with the Store API."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import polars as pl
import pytest
from _study import study_dict, study_toml
from typer.testing import CliRunner

from distsim.cli import app
from distsim.config import parse_study
from distsim.store import Store, StoreError, model_id

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

MLP, CNN = {"kind": "mlp", "widths": [4]}, {"kind": "cnn", "channels": [2]}
CLI = study_dict(
    study={"name": "cli", "store": "store"},
    data={"dataset": "synthetic", "num_tasks": 2},
    arch=[MLP, CNN],
    train={"seeds_per_task": 3, "epochs": 1},
    tests={"protocols": ["closed-set"]},  # open-set needs 4 tasks
)
STUDY = study_toml(CLI)


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def study_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "study.toml"
    path.write_text(STUDY)
    return path


@pytest.fixture(scope="module")
def store(study_file) -> Store:
    """2 archs x 2 tasks x 3 seeds of models, tests for 2 methods x 2 protocols, top-2
    neighbours."""
    study = parse_study(STUDY, base_dir=study_file.parent)
    store = Store(study.store)
    store.check_study(study)
    for arch in ("mlp", "cnn"):
        for task in (0, 1):
            seeds = study.model_seeds(task)
            rows = [{"model_id": model_id(arch, task, s), "seed": s, "task_name": f"syn:{task}",
                     "trial_id": f"arch={arch}/task={task}/pack=0", "node": "node-a",
                     "status": "diverged" if (arch, task, i) == ("cnn", 1, 2) else "ok",
                     "train_acc": 1.0, "test_acc": 0.9 + i / 100,
                     "test_loss": float("nan") if i == 2 else 0.1,
                     "epochs": 1, "seconds": 0.5} for i, s in enumerate(seeds)]
            store.write_shard("models", {"arch": arch, "task": task, "pack": 0}, rows)
    for method, observed in (("chain-gram", 1.0), ("raw", 0.6)):
        for protocol, stat in (("closed-set", "accuracy"), ("open-set", "mAP")):
            key = {"arch": "mlp", "method": method, "layer": "out", "protocol": protocol}
            store.write_shard("tests", key, {
                "statistic": [stat], "observed": [observed], "chance": [0.5], "null_mean": [0.5],
                "null_sd": [0.1], "effect_size": [(observed - 0.5) / 0.1],
                "p_value": [0.01 if observed == 1.0 else 0.2], "permutations": [99],
                "n_models": [6], "n_tasks": [2], "seed": [0], "extra": ['{"cmc@1": 1.0}']})
    ids = [model_id("mlp", t, s) for t in (0, 1) for s in study.model_seeds(t)]
    rows = [{"model_id": m, "task": i // 3, "rank": r, "neighbor_id": ids[(i + r) % 6],
             "neighbor_task": ((i + r) % 6) // 3, "distance": 0.1 * r,
             "same_task": (i // 3) == ((i + r) % 6) // 3}
            for i, m in enumerate(ids) for r in (1, 2)]
    key = {"arch": "mlp", "method": "chain-gram", "layer": "out", "block": 0}
    store.write_shard("neighbors", key, rows)
    store.mark_stage("zoo", models=12)
    return store


# ----------------------------------------------------------------------------- validate / launch


def test_validate_prints_the_plan(study_file):
    result = run("validate", study_file)
    assert result.exit_code == 0, result.output
    assert "ok: study 'cli'" in result.stdout
    assert "arch cnn (cnn): 6 models in 2 trials" in result.stdout


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.toml")), ids=lambda p: p.name)
def test_validate_every_job(job):
    if job.name == "cifar100-gpu.toml":  # its .npz is on the cluster's shared volume
        refused = run("validate", job)
        assert refused.exit_code == 2
        assert refused.stderr.startswith("error: data.path: no such file '/mnt/shared/")
        result = run("validate", job, "--no-data")
    elif job.name.startswith("import-"):  # their zoo is a fixture written first: with the
        # source read, tests/test_import.py::test_each_example_job_validates_on_the_fixture...
        result = run("validate", job, "--no-data")
    else:
        result = run("validate", job)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "text,start",
    [
        (study_toml(CLI, train={"epochs": 0}),
         "error: train.epochs: must be an integer in [1, inf)"),
        (study_toml(CLI, train={"epochs": None, "epoch": 1}),
         "error: train.epoch: unknown key; allowed:"),
        (study_toml(CLI, arch=[MLP, {**CNN, "kind": 3}]),
         "error: arch[1].kind: must be one of mlp, cnn, rnn, resnet, transformer, got integer 3"),
        (study_toml(CLI, train=None, trian=CLI["train"]), "error: trian: unknown key"),
        (STUDY.replace("[data]", "[data"), "error: invalid TOML"),
        (study_toml(CLI, data={"num_tasks": -2}),
         "error: data.num_tasks: must be an integer in [1, inf)"),
    ],
    ids=["range", "unknown", "type", "section", "toml", "negative"],
)
def test_config_errors_are_one_line_with_exit_code_2(tmp_path, text, start):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for command in ("validate", "launch"):
        result = run(command, path)
        assert result.exit_code == 2, (command, result.output)
        assert result.stdout == ""
        assert result.stderr.startswith(start), result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_missing_study_file_is_exit_2(tmp_path):
    result = run("validate", tmp_path / "nope.toml")
    assert result.exit_code == 2 and "no such study file" in result.stderr


def test_console_script_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(study_toml(CLI, train={"seeds_per_trial": 4}))
    proc = subprocess.run([sys.executable, "-m", "distsim.cli", "validate", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: train.seeds_per_trial: must be an integer in [1, 3] (train.seeds_per_task), got 4\n"
    )


@pytest.fixture
def fake_pipeline(monkeypatch):
    """Stand-in for distsim.pipeline.launch (Ray-free): records the run_study call."""
    calls = []
    module = types.ModuleType("distsim.pipeline.launch")

    def run_study(study, *, address=None, stages=(), fresh=False, partial=False, confirm=None,
                  space_check=True):
        calls.append({"study": study.name, "address": address, "stages": stages, "fresh": fresh,
                      "partial": partial, "asks": confirm is not None, "space": space_check})
        if address == "bad":
            raise StoreError("study changed; launch with --fresh")

    module.run_study = run_study
    monkeypatch.setitem(sys.modules, "distsim.pipeline.launch", module)
    return calls


def test_launch_passes_study_address_stages_and_fresh(study_file, fake_pipeline):
    assert run("launch", study_file).exit_code == 0
    result = run("launch", study_file, "--address", "auto", "--stages", "tests,zoo", "--fresh",
                 "--partial", "--no-space-check")
    assert result.exit_code == 0, result.output
    assert fake_pipeline == [
        {"study": "cli", "address": None, "stages": ("zoo", "features", "pairs", "tests"),
         "fresh": False, "partial": False, "asks": False,  # no terminal here: nobody to ask
         "space": True},
        {"study": "cli", "address": "auto", "stages": ("zoo", "tests"), "fresh": True,
         "partial": True, "asks": False, "space": False},
    ]


def test_launch_checks_the_data_before_ray(tmp_path, fake_pipeline):
    path = tmp_path / "npz.toml"
    path.write_text(study_toml(CLI, data={"dataset": "npz", "path": "missing.npz"}))
    result = run("launch", path)
    assert result.exit_code == 2 and fake_pipeline == []
    assert result.stderr == f"error: data.path: no such file {str(tmp_path / 'missing.npz')!r}\n"


def test_launch_user_errors_exit_2(study_file, fake_pipeline):
    result = run("launch", study_file, "--stages", "zoo,train")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --stages: 'train' is not a stage")
    result = run("launch", study_file, "--address", "bad")
    assert result.exit_code == 2 and result.stderr == "error: study changed; launch with --fresh\n"
    assert len(fake_pipeline) == 1


# ----------------------------------------------------------------------------- status / query


def test_status_shows_stages_and_model_counts(store):
    result = run("status", store.root)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    states = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    assert states["zoo"][:2] == ["complete", "4/4"]
    assert states["features"][:3] == ["pending", "0/4", "packs"]
    # neighbors and tests stored without the fingerprint of the feature rows they came from
    assert states["pairs"][:3] == ["stale", "0/8", "matrices"]
    # 8 matrices x (closed-set, permanova, permdisp); the fixture's closed-set rows have no lineage
    assert states["tests"] == ["stale", "0/24", "tests", "(2", "stale)"]
    row = [line for line in lines if "cnn" in line][0]
    # expected, ok, diverged, failed, mean train / test accuracy of the ok models, features, tests
    assert [c.strip() for c in row.strip("│ ").split("┆")] == [
        "cnn", "6", "5", "1", "0", "1.0000", "0.9080", "0", "0"]


def test_query_models_json_is_machine_readable(store):
    result = run("query", "models", store.root, "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 12
    assert rows[0]["model_id"] == "mlp-t0-s0" and rows[0]["test_acc"] == 0.9  # archs in study order
    assert rows[6]["model_id"] == "cnn-t0-s0"
    assert rows[2]["test_loss"] is None  # NaN -> null


def test_a_filter_that_matches_nothing_says_what_the_store_has(store):
    result = run("query", "models", store.root, "--arch", "transformer")
    assert result.exit_code == 0, result.output
    assert result.stderr == ("no models match --arch 'transformer'; the store has arch: cnn, "
                             "mlp\n")
    result = run("query", "models", store.root, "--arch", "cnn", "--status", "failed")
    assert "no models match --arch 'cnn' --status 'failed'" in result.stderr


def test_verify_reports_one_line_per_problem_and_exits_1(store, tmp_path):
    store = Store(shutil.copytree(store.root, tmp_path / "copy"))  # the fixture is shared
    result = run("verify", store.root)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines and all(": no lineage" in line or ": stale" in line for line in lines), lines
    assert result.stderr == f"{len(lines)} problem(s) in {store.root}\n"
    for path in store.shard_files("tests") + store.shard_files("neighbors"):
        path.unlink()
    result = run("verify", store.root)
    assert result.exit_code == 0 and result.stdout == f"ok: {store.root} is sound\n", result.output


def test_query_models_filters_and_csv(store, study_file):
    result = run("query", "models", study_file, "--arch", "cnn", "--status", "diverged",
                 "--format", "csv")
    assert result.exit_code == 0, result.output
    df = pl.read_csv(io.StringIO(result.stdout))
    assert df["model_id"].to_list() == ["cnn-t1-s5"] and df["status"].to_list() == ["diverged"]
    result = run("query", "models", store.root, "--task", "1", "--limit", "2", "--format", "csv")
    assert pl.read_csv(io.StringIO(result.stdout)).height == 2


def test_query_table_fits_a_terminal_and_says_when_cut(store):
    result = run("query", "models", store.root, "--limit", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert sum("mlp-t0" in line for line in lines) == 3
    assert "(3 of 12 rows; --limit 0 shows all)" in result.stderr


def test_query_table_drops_right_columns_on_a_narrow_terminal(store):
    result = runner.invoke(app, ["query", "models", str(store.root), "--limit", "2"],
                           env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 60
    assert "model_id" in result.stdout and "node" not in result.stdout
    assert "(not shown to fit 60 columns:" in result.stderr and "node" in result.stderr


def test_query_tests_and_neighbors(store):
    result = run("query", "tests", store.root, "--method", "chain-gram", "--protocol", "open-set",
                 "--format", "json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert (row["statistic"], row["observed"], row["p_value"], row["layer"]) == (
        "mAP", 1.0, 0.01, "out")
    # json: every column
    assert json.loads(row["extra"]) == {"cmc@1": 1.0} and row["effect_size"] == 5.0
    result = run("query", "neighbors", store.root, "--model", "mlp-t0-s1", "--format", "json")
    rows = json.loads(result.stdout)
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["neighbor_id"] == "mlp-t0-s2"


def test_query_sql_over_the_tables(store):
    sql = ("SELECT m.arch, count(*) AS n, avg(m.test_acc) AS acc FROM models m "
           "WHERE m.status = 'ok' GROUP BY m.arch ORDER BY m.arch")
    result = run("query", "sql", store.root, sql, "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["arch"], r["n"]) for r in rows] == [("cnn", 5), ("mlp", 6)]
    join = ("SELECT n.model_id, m.seed FROM neighbors n "
            "JOIN models m ON n.neighbor_id = m.model_id "
            "WHERE n.rank = 1 ORDER BY n.model_id")
    result = run("query", "sql", store.root, join, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert pl.read_csv(io.StringIO(result.stdout)).height == 6


@pytest.mark.parametrize(
    "args,words",
    [
        (["query", "sql", "{store}", "SELEC 1"], "error: query sql: only one SELECT"),
        (["query", "sql", "{store}", "SELECT * FROM nope"],
         "error: query sql: relation 'nope' was not found"),
        (["query", "sql", "{store}", "DELETE FROM models"], "error: query sql: only one SELECT"),
        (["query", "sql", "{store}", "DROP TABLE models"], "error: query sql: only one SELECT"),
        (["query", "sql", "{store}", "CREATE TABLE t AS SELECT * FROM models"],
         "error: query sql: only one SELECT"),
        (["query", "sql", "{store}", "SELECT * FROM read_csv('/etc/os-release')"],
         "error: query sql: table function read_csv"),
        (["query", "models", "{missing}"], "error: no distsim store at"),
        (["status", "{missing}"], "error: no distsim store at"),
        (["query", "models", "{store}", "--limit", "-1"], "error: --limit must be >= 0"),
    ],
)
def test_query_user_errors_exit_2(store, tmp_path, args, words):
    args = [a.format(store=store.root, missing=tmp_path / "missing") for a in args]
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(words) and result.stderr.count("\n") == 1, result.stderr


def test_query_tests_csv_and_json_encode_the_null_list_column(tmp_path):
    """A list cell (each test's null) is one JSON text in CSV and a JSON list in JSON, NaN ->
    null in both; r2 and q_value come with every row."""
    store = Store(tmp_path / "s")
    store.check_study(parse_study(STUDY))
    for protocol, p, null, extra in (("closed-set", 0.01, [0.5, float("nan"), 0.25], "{}"),
                                     ("permanova", 0.04, [1.0, 2.0], '{"r2": 0.3}')):
        key = {"arch": "mlp", "method": "raw", "layer": "out", "protocol": protocol}
        store.write_shard("tests", key, {"statistic": ["s"], "observed": [1.0], "p_value": [p],
                                         "extra": [extra], "null": [null]})
    nulls = [[0.5, None, 0.25], [1.0, 2.0]]
    csv = run("query", "tests", store.root, "--format", "csv")
    assert csv.exit_code == 0, csv.output
    got = pl.read_csv(io.StringIO(csv.stdout))
    assert [json.loads(cell) for cell in got["null"]] == nulls
    assert got["r2"].to_list() == [None, 0.3]
    assert got["q_value"].to_list() == pytest.approx([0.02, 0.04])
    rows = json.loads(run("query", "tests", store.root, "--format", "json").stdout)
    assert [r["null"] for r in rows] == nulls
    assert [(r["r2"], r["q_value"]) for r in rows] == [(None, pytest.approx(0.02)), (0.3, 0.04)]
    one = json.loads(run("query", "tests", store.root, "--protocol", "permanova", "--format",
                         "json").stdout)
    assert [(r["r2"], r["q_value"]) for r in one] == [(0.3, 0.04)]  # q of the whole family


def test_query_on_an_empty_store_prints_an_empty_table(tmp_path):
    store = Store(tmp_path / "s")
    store.check_study(parse_study(STUDY))
    result = run("query", "tests", store.root, "--format", "json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []


# ------------------------------------------------------------------------ help, tables, legend


def test_help_short_option_version_and_plain_flags():
    from distsim import __version__

    top = run("-h")
    assert top.exit_code == 0 and "Commands:" in top.stdout
    for command in ("validate", "launch", "status", "verify", "report", "export", "query"):
        assert f"  {command} " in top.stdout
    assert run("--version").stdout == f"distsim {__version__}\n"
    launch = run("launch", "-h")
    assert launch.exit_code == 0 and "--fresh" in launch.stdout
    assert "<bool>" not in launch.stdout  # a plain flag takes no value


def test_query_tables_lists_every_table_and_column():
    from distsim.store.tables import TABLES

    result = run("query", "tables")
    assert result.exit_code == 0
    for spec in TABLES.values():
        assert f"{spec.name}: one row per {spec.row}" in result.stdout
    weights = run("query", "tables", "weights").stdout.splitlines()
    assert weights[0] == "weights: one row per model x tensor; shard key arch, task, pack"
    assert [line.split()[:2] for line in weights[-2:]] == [["shape", "list<int32>"],
                                                          ["values", "list<float32>"]]
    bad = run("query", "tables", "nope")
    assert bad.exit_code == 2 and "no table 'nope'; tables: models, weights" in bad.stderr


def test_sql_names_the_quoting_a_keyword_column_needs(store):
    result = run("query", "sql", store.root, "SELECT model_id, values FROM weights")
    assert result.exit_code == 2
    assert 'the column values is an SQL keyword: write it in double quotes, "values"' in (
        result.stderr)
    assert run("query", "sql", store.root, 'SELECT model_id, "values" FROM weights').exit_code == 0


def test_summary_is_a_grid_per_arch_with_its_legend_and_the_query_command(store):
    from distsim.summary import format_summary, summary_table

    study = parse_study(STUDY, base_dir=store.root.parent)
    table = summary_table(store, study)
    text = format_summary(table, store.root)
    grid, legend, every = text.split("\n\n")
    assert grid.splitlines() == [
        "mlp: 6 models",
        "layer  chain-gram  raw",
        "       acc/chance  acc/chance",
        "out    1.00/0.50*  0.60/0.50",  # q 0.02 and 0.2: each number marked by its own q
    ]
    words = [line.split()[0] for line in legend.splitlines() if not line.startswith(" ")]
    assert words == ["chain-gram", "raw", "acc/chance", "*", "q", "note"]
    assert "the closed-set test's after acc/chance" in legend
    assert "0.01 for 99" in legend  # the p floor
    assert "positively dependent (PRDS)" in legend and "Benjamini-Yekutieli" in legend
    assert "no PERMANOVA tests in this store" in legend  # no R2: said, not left blank
    assert "open-set" not in legend and "permdisp" not in legend  # only what the grid shows
    assert every == (f"every row, with p and q (also open-set): distsim query tests {store.root} "
                     "--limit 0")
    assert max(len(line) for line in f"{grid}\n{legend}".splitlines()) <= 100
    # the summary's r2 and q_value are the query's (one function computes them)
    rows = json.loads(run("query", "tests", store.root, "--format", "json").stdout)
    query = {(r["layer"], r["method"], r["protocol"]): (r["r2"], r["q_value"]) for r in rows}
    assert query == {(r["layer"], r["method"], r["protocol"]): (r["r2"], r["q_value"])
                     for r in table.iter_rows(named=True)}
    assert sorted(v[1] for v in query.values()) == pytest.approx([0.02, 0.02, 0.2, 0.2])
