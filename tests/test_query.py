"""Read-only SQL over a store (one SELECT, no file-reading table functions, a plan that scans
only the store's tables) and the notes for filters that match nothing."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from distsim.store import Store, StoreError, model_id
from distsim.store import query as q
from distsim.store.query import empty_filter_note, read_only_sql

TABLES_HINT = ("query the tables models, weights, templates, features, neighbors, pairs, tests, "
               "history")
OS_RELEASE = Path("/etc/os-release")


def models(arch: str, task: int, seeds=(0, 1, 2), status="ok"):
    return [{"model_id": model_id(arch, task, s), "seed": s, "status": status,
             "test_acc": 0.5 + s / 10} for s in seeds]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """models: mlp tasks 0-2 (ok), cnn task 0 (ok) and 3 (failed); tests: one mlp row;
    a Parquet file outside the store folder, beside it."""
    root = tmp_path_factory.mktemp("q")
    store = Store(root / "store")
    for task in (0, 1, 2):
        store.write_shard("models", {"arch": "mlp", "task": task, "pack": 0}, models("mlp", task))
    store.write_shard("models", {"arch": "cnn", "task": 0, "pack": 0}, models("cnn", 0))
    store.write_shard("models", {"arch": "cnn", "task": 3, "pack": 0},
                      models("cnn", 3, status="failed"))
    store.write_shard("tests", {"arch": "mlp", "method": "raw", "layer": "fc1",
                                "protocol": "closed-set"},
                      [{"statistic": "accuracy", "observed": 0.9, "p_value": 0.01}])
    pl.DataFrame({"secret": ["outside"]}).write_parquet(root / "outside.parquet")
    return store


def outside(store: Store) -> Path:
    return store.root.parent / "outside.parquet"


def files(store: Store) -> list[str]:
    return sorted(str(p) for p in store.root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- allowed


@pytest.mark.parametrize("sql, rows", [
    ("SELECT count(*) AS n FROM models", [(15,)]),
    ("select arch, count(*) AS n FROM models GROUP BY arch ORDER BY arch",
     [("cnn", 6), ("mlp", 9)]),
    ("SELECT m.arch, t.p_value FROM models m JOIN tests t ON m.arch = t.arch "
     "WHERE m.task = 0 AND m.seed = 0", [("mlp", 0.01)]),
    ("WITH ok AS (SELECT * FROM models WHERE status = 'ok') "
     "SELECT count(DISTINCT task) FROM ok", [(3,)]),
    ("(SELECT arch FROM models WHERE task = 3) UNION (SELECT arch FROM tests)",
     [("cnn",), ("mlp",)]),
    ("  ((SELECT max(seed) FROM models));", [(2,)]),
    ("SELECT count(*) FROM models;; -- a trailing ';' ends nothing", [(15,)]),
    ("SELECT count(*) FROM models /* ; DROP TABLE models */", [(15,)]),
    ("SELECT 'drop table models; delete' AS \"update\" FROM tests",
     [("drop table models; delete",)]),
    ("SELECT `insert`.status FROM models AS `insert` WHERE task = 3 LIMIT 1", [("failed",)]),
    ("SELECT 'read_csv(''/etc/os-release'')' AS x FROM tests", [("read_csv('/etc/os-release')",)]),
])
def test_one_select_over_the_tables_runs(store, sql, rows):
    lf = read_only_sql(store, sql)
    assert isinstance(lf, pl.LazyFrame)
    assert sorted(lf.collect().rows()) == rows


def test_an_empty_table_is_queried_as_an_empty_frame(store):
    assert read_only_sql(store, "SELECT * FROM pairs").collect().height == 0


# ----------------------------------------------------------------------------- refused


@pytest.mark.parametrize("sql, word", [
    ("DELETE FROM models", "DELETE"),
    ("drop table models", "DROP"),
    ("CREATE TABLE t AS SELECT * FROM models", "CREATE"),
    ("INSERT INTO models SELECT * FROM models", "INSERT"),
    ("UPDATE models SET seed = 1", "UPDATE"),
    ("TRUNCATE models", "TRUNCATE"),
    ("EXPLAIN SELECT * FROM models", "EXPLAIN"),
    ("SHOW TABLES", "SHOW"),
    ("COPY models TO 'x.csv'", "COPY"),
    ("ATTACH 'x.db' AS x", "ATTACH"),
    ("SET x = 1", "SET"),
    ("WITH a AS (SELECT 1) DELETE FROM models", "DELETE"),
    ("SELECT * INTO t FROM models", "INTO"),
    ("VALUES (1)", "VALUES"),
    ("/* a comment */ DELETE FROM models", "DELETE"),
    ("-- a comment\n  (( DrOp TABLE models", "DROP"),
    ("/* nested /* comments */ still a comment */ TRUNCATE models", "TRUNCATE"),
])
def test_statements_other_than_one_select_are_refused(store, sql, word):
    before = files(store)
    with pytest.raises(StoreError, match=f"only one SELECT over the store's tables is allowed, "
                                         f"got {word}$"):
        read_only_sql(store, sql)
    assert files(store) == before
    assert read_only_sql(store, "SELECT count(*) FROM models").collect().item() == 15


@pytest.mark.parametrize("sql, got", [
    ("SELECT 1; DROP TABLE models", "2 statements"),
    ("SELECT * FROM models; SELECT * FROM tests;", "2 statements"),
    ("SELECT 1 /* ; */ ; -- \n DELETE FROM models", "2 statements"),
    ("", "an empty query"),
    (" ; /* nothing */ ", "an empty query"),
])
def test_more_or_less_than_one_statement_is_refused(store, sql, got):
    with pytest.raises(StoreError, match=f"allowed, got {got}$"):
        read_only_sql(store, sql)


@pytest.mark.parametrize("function", [
    "read_csv", "READ_CSV", '"read_csv"', "`read_csv`", "read_json", "read_ndjson", "read_ipc",
    "read_parquet", "read_csv /* a comment */",
])
def test_table_functions_are_refused_and_never_show_the_file(store, function):
    sql = f"SELECT * FROM {function}('{OS_RELEASE}')"
    with pytest.raises(StoreError, match=r"table function read_\w+\(\.\.\.\) reads files "
                                         f"outside the store; {TABLES_HINT} instead") as err:
        read_only_sql(store, sql)
    if OS_RELEASE.is_file():
        assert OS_RELEASE.read_text().splitlines()[0] not in str(err.value)


def test_read_parquet_of_a_file_outside_the_store_is_refused(store):
    with pytest.raises(StoreError, match=r"table function read_parquet\(\.\.\.\)"):
        read_only_sql(store, f"SELECT * FROM read_parquet('{outside(store)}')")


def test_comments_and_quotes_cannot_hide_a_table_function(store):
    # polars nests /* */ comments: the ' inside is no string, read_csv is code
    sql = f"SELECT * FROM models /* /* */ ' */ , read_csv('{OS_RELEASE}') --'"
    with pytest.raises(StoreError, match=r"table function read_csv\(\.\.\.\)"):
        read_only_sql(store, sql)


@pytest.mark.parametrize("sql, match", [
    ("SELECT $$ ' $$ AS x FROM models", r"'\$' is only allowed inside quotes"),
    ("SELECT $t$x$t$ AS x FROM models", r"'\$' is only allowed inside quotes"),
    ("SELECT E'\\'' AS x FROM models", r"prefixed strings like E'\.\.\.' are not supported"),
    ("SELECT U&'x' AS x FROM models", r"prefixed strings like U&'\.\.\.' are not supported"),
])
def test_string_forms_that_could_be_misread_are_refused(store, sql, match):
    with pytest.raises(StoreError, match=match):
        read_only_sql(store, sql)


@pytest.mark.parametrize("sql, match", [
    ("SELECT nope FROM models", r'^query sql: unable to find column "nope"; valid columns: '),
    ("SELECT * FROM nowhere", r"^query sql: relation 'nowhere' was not found$"),
    ("SELECT * FROM models WHERE", r"^query sql: sql parser error: "),
])
def test_polars_errors_are_one_line_store_errors(store, sql, match):
    with pytest.raises(StoreError, match=match) as err:
        read_only_sql(store, sql)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the plan check


@pytest.fixture(params=["plan", "plan text"])
def plan_check_only(request, monkeypatch):
    """The text check switched off, so only the plan check stands; "plan text": the fallback
    used when polars' plan visitor is unavailable."""
    monkeypatch.setattr(q, "_check_text", lambda sql: None)
    if request.param == "plan text":
        monkeypatch.setattr(q, "_plan_scans", lambda lf: 1 / 0)
    return request.param


def test_the_plan_check_refuses_files_outside_the_store_whatever_the_syntax(
        store, plan_check_only):
    for source in [f"read_csv('{OS_RELEASE}')", f"read_parquet('{outside(store)}')",
                   f"read_parquet('{store.root}/models/../../outside.parquet')",
                   f"read_parquet('{store.root}/../*.parquet')"]:
        if "csv" in source and not OS_RELEASE.is_file():
            continue
        with pytest.raises(StoreError, match=r"the query reads .*, which is none of the store's "
                                             f"table.*; {TABLES_HINT}") as err:
            read_only_sql(store, f"SELECT * FROM models, {source} AS x")
        assert "outside'" not in str(err.value)  # the file's content never shows


def test_the_plan_check_passes_the_stores_own_scans(store, plan_check_only):
    sql = ("SELECT m.arch, count(*) FROM models m JOIN tests t ON m.arch = t.arch "
           "CROSS JOIN (SELECT count(*) AS n FROM pairs) AS p GROUP BY m.arch")
    assert read_only_sql(store, sql).collect().rows() == [("mlp", 9)]


def test_the_plan_lists_every_scanned_file(store):
    lf = pl.scan_parquet(f"{store.root}/models/*/*.parquet")
    assert "other sources]" in lf.explain(optimized=False)  # the plan text elides files
    paths = [p for _, p in q._plan_scans(lf)]
    assert sorted(paths) == sorted(str(p) for p in store.shard_files("models"))


# ----------------------------------------------------------------------------- empty filters


def test_a_filter_value_the_table_lacks_names_the_values_it_has(store):
    note = empty_filter_note(store, "models", {"arch": "transformer", "task": None})
    assert note == "no models match --arch 'transformer'; the store has arch: cnn, mlp"
    note = empty_filter_note(store, "models", {"arch": "gru", "task": 7, "status": "ok"})
    assert note == ("no models match --arch 'gru' --task 7 --status 'ok'; "
                    "the store has arch: cnn, mlp; task: 0, 1, 2, 3")


def test_values_that_each_occur_but_not_together(store):
    note = empty_filter_note(store, "models", {"arch": "mlp", "task": 3})
    assert note == "no models match --arch 'mlp' --task 3 together"
    assert empty_filter_note(store, "models", {"arch": "mlp", "task": 2}) is None
    assert empty_filter_note(store, "models", {"arch": None}) is None


def test_model_ids_are_the_model_option_and_long_lists_are_cut(tmp_path):
    store = Store(tmp_path)
    store.write_shard("models", {"arch": "mlp", "task": 0, "pack": 0},
                      models("mlp", 0, seeds=range(25)))
    note = empty_filter_note(store, "models", {"model_id": "mlp-t9-s0"})
    shown = sorted(model_id("mlp", 0, s) for s in range(25))[:20]
    assert note == (f"no models match --model 'mlp-t9-s0'; the store has model_id: "
                    f"{', '.join(shown)}, ... and 5 more")


def test_an_empty_table_says_so(store):
    assert empty_filter_note(store, "neighbors", {"arch": "mlp"}) == (
        "the store has no neighbors rows yet")
