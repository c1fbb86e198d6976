"""Read-only queries of a store: one SELECT over its tables, filters that say they match nothing.

``read_only_sql`` runs user SQL through polars' SQLContext, which happily runs more than
SELECTs: ``DROP TABLE``/``TRUNCATE``/``CREATE TABLE`` change its tables, ``EXPLAIN`` returns
plans and the table functions ``read_csv``, ``read_parquet``, ``read_json``, ``read_ndjson``
and ``read_ipc`` read any file (a CSV's header already at planning, into column names and
error messages). So the text is checked first (one SELECT or WITH, no table functions, read
as polars' parser reads it: comments, nested ``/* */``, quotes), and then, as the boundary
that syntax cannot fool, every scan of the planned query must be a Parquet file of one of
the store's tables.

``models_with_meta`` is the models table as every reader shows it: an imported model's metadata
as columns; ``group_codes`` the groups the tests compare (``tests.group_by``).

``tests_with_q`` is the tests table as every reader shows it (the summary, ``distsim query
tests``, ``distsim.open(path).tests()``): plus ``r2`` and ``q_value``, computed here once.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import polars as pl

from distsim.errors import StoreError
from distsim.store.shards import ShardStore
from distsim.store.tables import TABLES

_STARTS = frozenset({"SELECT", "WITH"})  # what the one statement may start with
_WRITES = frozenset({  # statement words refused anywhere outside quotes (e.g. WITH ... DELETE)
    "ALTER", "ATTACH", "COPY", "CREATE", "DELETE", "DETACH", "DROP", "EXPLAIN", "GRANT",
    "INSERT", "INSTALL", "INTO", "LOAD", "MERGE", "PRAGMA", "SET", "SHOW", "TRUNCATE", "UPDATE",
})
_FILE_FUNCTION = re.compile(r"(?:read|scan)_\w+", re.IGNORECASE)  # read_csv, read_parquet, ...
# One token of polars' SQL dialect (sqlparser's generic one): no backslash escapes in strings,
# '' and "" and `` escape their quote, `--` comments run to a newline, `/*` comments nest (see
# _comment_end). Possessive quantifiers never backtrack into a shorter string.
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>--[^\n]*+)
  | (?P<block>/\*)
  | (?P<string>'(?:[^']|'')*+(?:'|\Z))
  | (?P<quoted>"(?:[^"]|"")*+(?:"|\Z)|`(?:[^`]|``)*+(?:`|\Z))
  | (?P<word>[\w#@$]+)
  | (?P<other>.)
""", re.VERBOSE | re.DOTALL)
_PREFIXED = re.compile(r"[\w#@$&]")  # a character that makes E'..', N'..', U&'..' a prefix
_SCAN_LINE = re.compile(r"^\s*\w+ SCAN \[")  # a scan in plan text: "Parquet SCAN [<path>, ...]"
_SHOWN = 20  # values listed by empty_filter_note before "... and N more"
TEST_KEY = ("arch", "layer", "method", "protocol", "factor", "epoch")  # one tests row


def tests_with_q(store: ShardStore) -> pl.LazyFrame:
    """The store's whole tests table plus two columns, in the table's row order:

    - ``r2`` (Float64): PERMANOVA's R^2 (the share of the features' spread the tasks explain)
      and PERMDISP's, from the row's ``extra`` JSON; null for the HTT protocols;
    - ``q_value`` (Float64): Benjamini-Hochberg over every test in the store (one family:
      the study's tests; NaN where p_value is missing), by distsim.stats.q_values.

    The only place both are computed: filter the result, not the table, so that q keeps its
    family."""
    from distsim.stats.multiple_testing import q_values

    lf = store.scan("tests")
    rows = lf.select(*TEST_KEY, "p_value", "extra").collect()
    r2 = [json.loads(e).get("r2") if e else None for e in rows["extra"]]
    derived = rows.select(TEST_KEY).with_columns(
        pl.Series("r2", [None if v is None else float(v) for v in r2], dtype=pl.Float64),
        pl.Series("q_value", q_values(rows["p_value"].to_numpy()), dtype=pl.Float64))
    return lf.join(derived.lazy(), on=list(TEST_KEY), how="left", maintain_order="left",
                   nulls_equal=True)


def models_with_meta(store: ShardStore) -> pl.LazyFrame:
    """The models table plus one typed column per key of ``source_meta`` (an imported model's
    metadata: its config's hyperparameters, metrics, labels) or of ``factors`` (a swept model's
    [sweep] values: lr, weight_decay, ...), under the key's own name, typed
    over the whole table (ints, floats, strings, booleans; null where a model lacks the key).
    A key that names a models column (seed, epoch, test_acc, ...) is that column already and
    is not repeated. A trained study's table comes back as it is."""
    lf = store.scan("models")
    json_text = pl.coalesce("source_meta", "factors").alias("json")  # one of them per model
    meta = lf.select("model_id", json_text).filter(pl.col("json").is_not_null())
    found = meta.collect()
    if found.height == 0:
        return lf
    decoded = found["json"].str.json_decode(infer_schema_length=None)
    wide = pl.DataFrame({"model_id": found["model_id"]}).with_columns(
        decoded.struct.unnest())
    extra = [c for c in wide.columns[1:] if c not in TABLES["models"].schema.names]
    if not extra:
        return lf
    return lf.join(wide.select("model_id", *extra).lazy(), on="model_id", how="left",
                   maintain_order="left")


def group_codes(models: ShardStore | pl.DataFrame, model_ids: list[str], group_by: str,
                bins: int | tuple[float, ...] | None = None,
                key: str = "tests.group_by") -> tuple[np.ndarray, list[str]]:
    """The group of each model of `model_ids` by the models column `group_by` (a metadata
    column too, :func:`models_with_meta`): codes (N,) int64 in 0..G-1, in the order of the
    sorted distinct values, and the G values' names. bins: a numeric column cut into that many
    equal-count bins (quantile edges) or at the given edges first; a group is then named
    ``[lo, hi)``. StoreError (one line) for an unknown column, a model without a value, or a
    non-numeric column with bins. models: a store, or its models_with_meta frame read once (a
    stage asks for the groups of every feature matrix). key: the study key its errors name."""
    lf = models_with_meta(models) if isinstance(models, ShardStore) else models.lazy()
    names = lf.collect_schema().names()
    if group_by not in names:
        raise StoreError(f"{key}: {group_by!r} is not a column of models; columns: "
                         f"{', '.join(names)}")
    df = (pl.DataFrame({"model_id": model_ids})
          .join(lf.select("model_id", group_by).unique("model_id").collect(), on="model_id",
                how="left", maintain_order="left"))
    values = df[group_by]
    if values.null_count():
        first = df.filter(pl.col(group_by).is_null())["model_id"][0]
        raise StoreError(f"{key}: {group_by!r} is null for {values.null_count()} of "
                         f"{len(values)} models (e.g. {first})")
    if bins is None:
        keys = values.to_list()
        distinct = sorted(set(keys), key=lambda v: (isinstance(v, str), v))
        index = {v: i for i, v in enumerate(distinct)}
        return np.array([index[v] for v in keys], np.int64), [str(v) for v in distinct]
    if not values.dtype.is_numeric():
        raise StoreError(f"tests.group_bins: {group_by!r} holds {values.dtype}, not numbers")
    x = values.cast(pl.Float64).to_numpy()
    if isinstance(bins, int):  # equal-count bins: the inner quantiles are the edges
        edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1]))
    else:
        edges = np.asarray(bins, np.float64)
    codes = np.searchsorted(edges, x, side="right")  # v in [edges[i-1], edges[i]) -> i
    used = np.unique(codes)
    bounds = [-np.inf, *edges.tolist(), np.inf]
    labels = [f"[{bounds[i]:g}, {bounds[i + 1]:g})" for i in used]
    return np.searchsorted(used, codes).astype(np.int64), labels


def read_only_sql(store: ShardStore, sql: str) -> pl.LazyFrame:
    """The lazy result of `sql`, one SELECT over the store's tables (polars SQL); StoreError
    for anything that could write, explain, or read files other than the store's tables."""
    _check_text(sql)
    ctx = pl.SQLContext({name: store.scan(name) for name in TABLES}, eager=False)
    try:
        lf = ctx.execute(sql)
        _check_reads(store, lf)
    except (pl.exceptions.PolarsError, OSError) as exc:
        lines = str(exc).strip().splitlines()  # later lines are plans: a read file's header
        first = lines[0] if lines else type(exc).__name__
        raise StoreError(f"query sql: {first}{_quote_hint(first)}") from None
    return lf


def _quote_hint(error: str) -> str:
    """A hint when the parser stopped at a column whose name is an SQL keyword (``values``)."""
    m = re.search(r"found: (\w+)", error)
    columns = {c.name for t in TABLES.values() for c in t.columns}
    if m is None or m.group(1).lower() not in columns:
        return ""
    word = m.group(1)
    return f' (the column {word} is an SQL keyword: write it in double quotes, "{word}")'



def empty_filter_note(store: ShardStore, table: str, filters: dict[str, object]) -> str | None:
    """Why equality `filters` (None = not set) match no row of `table`, as one line for stderr:
    the values a filter asks for that the table lacks, with those it has. None when they match."""
    lf = store.scan(table)
    if lf.select(pl.len()).collect().item() == 0:
        return f"the store has no {table} rows yet"
    names = lf.collect_schema().names()
    wanted = {col: value for col, value in filters.items() if value is not None}
    missing = []
    for col, value in wanted.items():
        if col not in names:
            raise StoreError(f"{_option(col)} does not apply to {table}")
        has = lf.select(pl.col(col).drop_nulls().unique().sort()).collect().to_series().to_list()
        if value not in has:
            missing.append(f"{col}: {_listed(has)}")
    asked = " ".join(f"{_option(col)} {value!r}" for col, value in wanted.items())
    if missing:
        return f"no {table} match {asked}; the store has {'; '.join(missing)}"
    matching = lf.filter(*[pl.col(c) == v for c, v in wanted.items()]) if wanted else lf
    if not wanted or matching.select(pl.len()).collect().item():
        return None
    return f"no {table} match {asked} together"


def _check_text(sql: str) -> None:
    """Refuse SQL that is not one SELECT (or WITH) without table functions, read outside
    quotes and comments as polars reads it."""
    tokens = _code_tokens(sql)
    statements: list[list[tuple[str, str]]] = [[]]
    for kind, text in tokens:
        if text == ";" and kind == "other":
            statements.append([])
        else:
            statements[-1].append((kind, text))
    statements = [s for s in statements if s]  # trailing (or doubled) ";" end nothing
    if len(statements) != 1:
        got = f"{len(statements)} statements" if statements else "an empty query"
        raise StoreError(f"query sql: only one SELECT over the store's tables is allowed, "
                         f"got {got}")
    kind, first = next(((k, t) for k, t in statements[0] if t != "("), ("other", "("))
    first = first.upper() if kind == "word" else first
    bad = next((text.upper() for kind, text in tokens
                if kind == "word" and text.upper() in _WRITES), None)
    if first not in _STARTS or bad:
        raise StoreError(f"query sql: only one SELECT over the store's tables is allowed, "
                         f"got {bad or first}")
    for (kind, text), (_, after) in zip(tokens, tokens[1:], strict=False):
        name = text[1:-1] if kind == "quoted" else text
        if kind in ("word", "quoted") and after == "(" and _FILE_FUNCTION.fullmatch(name):
            raise StoreError(f"query sql: table function {name.lower()}(...) reads files "
                             f"outside the store; query the tables {', '.join(TABLES)} instead")


def _code_tokens(sql: str) -> list[tuple[str, str]]:
    """(kind, text) of the tokens of `sql` outside comments: word, quoted (an identifier),
    string or other; StoreError for the string forms this reading could get wrong."""
    tokens, pos = [], 0
    while pos < len(sql):
        m = _TOKEN.match(sql, pos)
        assert m is not None and m.lastgroup is not None  # `other` matches any character
        kind, text = m.lastgroup, m.group()
        if kind == "block":
            pos = _comment_end(sql, m.end())
            continue
        pos = m.end()
        if kind in ("space", "comment"):
            continue
        if "$" in text and kind in ("word", "other"):  # $$...$$ and $tag$...$tag$ are strings
            raise StoreError(f"query sql: '$' is only allowed inside quotes, got {text!r}; "
                             "write strings as '...' and odd names as \"...\"")
        if kind == "string" and _PREFIXED.match(sql[max(m.start() - 1, 0):m.start()]):
            prefix = re.findall(r"[\w#@&]*$", sql[:m.start()])[0]  # E'\'' has escapes
            raise StoreError(f"query sql: prefixed strings like {prefix}'...' are not "
                             "supported; write strings as '...'")
        tokens.append((kind, text))
    return tokens


def _comment_end(sql: str, pos: int) -> int:
    """Where the block comment whose "/*" ends at `pos` ends; comments nest, as in polars."""
    depth = 1
    while pos < len(sql) and depth:
        pair = sql[pos:pos + 2]
        depth += {"/*": 1, "*/": -1}.get(pair, 0)
        pos += 2 if pair in ("/*", "*/") else 1
    return pos


def _check_reads(store: ShardStore, lf: pl.LazyFrame) -> None:
    """Refuse `lf` unless every file its plan scans is a Parquet file of the store's tables."""
    try:
        scans = _plan_scans(lf)
    except Exception:  # the plan visitor is polars-internal: fall back to the public plan text
        own: set[str] = set().union(*(_scan_lines(store.scan(t)) for t in TABLES))
        foreign = sorted(_scan_lines(lf) - own)
        if foreign:
            raise StoreError(f"query sql: the query reads {foreign[0]}, which is none of the "
                             f"store's tables; query the tables {', '.join(TABLES)}") from None
        return
    root = str(store.root)
    for kind, path in scans:
        rel = os.path.relpath(os.path.abspath(path), root).split(os.sep) if path else [".."]
        if kind.lower() != "parquet" or "://" in (path or "") or rel[0] not in TABLES:
            raise StoreError(f"query sql: the query reads {path or kind!r}, which is none of "
                             f"the store's table files; query the tables {', '.join(TABLES)}")


def _plan_scans(lf: pl.LazyFrame) -> list[tuple[str, str | None]]:
    """(format, path) of every file scan in the plan of `lf`, globs expanded, none elided
    (unlike the plan text's "... 11 other sources"); (node kind, None) for other scans."""
    visitor = lf._ldf.visit()
    scans: list[tuple[str, str | None]] = []
    todo, seen = [visitor.get_node()], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        visitor.set_node(node)
        ir: Any = visitor.view_current_node()
        kind = type(ir).__name__
        if kind == "Scan":
            fmt = ir.scan_type[0] if isinstance(ir.scan_type, tuple) else ir.scan_type
            scans += [(str(fmt), p if isinstance(p, str) else None) for p in ir.paths]
        elif kind.endswith("Scan") and kind != "DataFrameScan":  # DataFrameScan: in memory
            scans.append((kind, None))
        todo += visitor.get_inputs()
    return scans


def _scan_lines(lf: pl.LazyFrame) -> set[str]:
    """The scan lines of the plan text of `lf` ("Parquet SCAN [<path>, ... 5 other sources]")."""
    return {line.strip() for line in lf.explain(optimized=False).splitlines()
            if _SCAN_LINE.match(line)}


def _option(col: str) -> str:
    """The CLI option filtering column `col` (model_id -> --model)."""
    return "--model" if col == "model_id" else f"--{col.replace('_', '-')}"


def _listed(values: list[Any]) -> str:
    """`values` comma-separated, the first few of many then "... and N more"."""
    shown = ", ".join(str(v) for v in values[:_SHOWN])
    more = len(values) - _SHOWN
    return f"{shown}, ... and {more} more" if more > 0 else shown or "(only nulls)"
