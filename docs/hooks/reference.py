"""mkdocs hook: the reference pages that are generated from the code at build time.

A page asks for a generated block with an HTML comment on a line of its own:

    <!-- generated: study-keys -->      one table per study-file section, from the
                                         constraint tables and the sections' dataclasses
    <!-- generated: cli -->              the `distsim` command line, from the Typer app
    <!-- generated: store-tables -->     the store's table contract (store.tables.markdown_table)

Registered in mkdocs.yml under `hooks:` (mkdocs >= 1.4). Nothing here is written to disk.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from distsim.config.arch import ARCH_PARAMS, ArchConfig
from distsim.config.data import DATA_PARAMS, DataConfig
from distsim.config.sections import (
    FEATURE_PARAMS,
    PAIR_PARAMS,
    PLAN_PARAMS,
    RESOURCE_PARAMS,
    STATS_PARAMS,
    STUDY_PARAMS,
    SWEEP_PARAMS,
    FeatureSpec,
    PairSpec,
    Resources,
    StatsSpec,
)
from distsim.config.study import TrainPlan
from distsim.config.training import TRAIN_PARAMS, TrainConfig
from distsim.config.zoo import ZOO_PARAMS, ZooSpec
from distsim.params import Constraint

MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", flags=re.MULTILINE)

# Defaults that no dataclass field holds: the loader's (distsim/config/loader.py).
LOADER_DEFAULTS = {
    "study.name": "required",
    "study.store": "required (relative to the study file's folder)",
    "study.seed": "`0`",
    "train.seeds_per_task": "required",
    "train.seeds_per_trial": "`train.seeds_per_task` (one pack per task)",
    "data.seed": "`study.seed`",
    "features.seed": "`study.seed`",
    "tests.seed": "`study.seed`",
    "arch.name": "the `kind`",
    **{f"sweep.{key}": "not swept" for key in SWEEP_PARAMS},
}
# Fields of a section's dataclass that are not keys of the study file.
NOT_KEYS: dict[str, tuple[str, ...]] = {}  # none since import studies declare input_shape


@dataclasses.dataclass(frozen=True)
class Section:
    """One section of a study file: its heading, key prefix, tables and dataclasses."""

    heading: str
    prefix: str
    tables: tuple[tuple[Mapping[str, Constraint], type | None], ...]
    intro: str
    documented: tuple[type, ...] = ()  # dataclasses whose docstrings describe the keys


SECTIONS = (
    Section("[study]", "study", ((STUDY_PARAMS, None),),
            "The study's name, seed and store folder. Checked by the loader."),
    Section("[zoo]", "zoo", ((ZOO_PARAMS, ZooSpec),),
            "Where the models come from: trained by the zoo stage (the default) or imported "
            "from a zoo someone else trained (`distsim.config.zoo.ZooSpec`; the layouts: "
            "[Bring your own zoo](../howto/own-zoo.md)). Optional section.", (ZooSpec,)),
    Section("[data]", "data", ((DATA_PARAMS, DataConfig),),
            f"Which tasks the zoo trains on: `{DataConfig.__module__}.DataConfig`. Optional in "
            "an import study, where it gives the `cka` method its probe inputs.",
            (DataConfig,)),
    Section("[[arch]]", "arch", ((ARCH_PARAMS, ArchConfig),),
            f"One table per architecture: `{ArchConfig.__module__}.ArchConfig`. "
            "In a trained study `input_shape` and `num_classes` are not keys: they come from "
            "the data; an import study gives both (and exactly one `[[arch]]`).",
            (ArchConfig,)),
    Section("[train]", "train", ((PLAN_PARAMS, TrainPlan), (TRAIN_PARAMS, TrainConfig)),
            "How many models per task and how each is trained (an import study has none). "
            "The plan keys "
            "(`distsim.config.study.TrainPlan`): `seeds_per_task` models per task and arch; "
            "`seeds_per_trial` of them trained together by one Ray Tune trial (a pack); "
            "`shared_init`: model i of every task starts from the same initial weights. Then "
            f"`{TrainConfig.__module__}.TrainConfig`. A table `[train.<arch name>]` "
            "overrides TrainConfig keys for one architecture.",
            (TrainConfig,)),
    Section("[sweep]", "sweep", ((SWEEP_PARAMS, None),),
            "A grid over `[train]` keys, crossed with the tasks and seeds: each key a list of "
            "values, each cell of the grid trains `seeds_per_task` models per task with those "
            "values (a swept key is not set in `[train]`). Each key becomes a column of "
            "`models` (`distsim query models`), so `[tests] group_by` can name it. Optional "
            "section; without it a study has one cell and its seeds and hash are unchanged."),
    Section("[resources]", "resources", ((RESOURCE_PARAMS, Resources),),
            "What one zoo trial and one feature actor ask Ray for: "
            "`distsim.config.sections.Resources`. Optional section.", (Resources,)),
    Section("[features]", "features", ((FEATURE_PARAMS, FeatureSpec),),
            "Which features to build: `distsim.config.sections.FeatureSpec`. Optional section.",
            (FeatureSpec,)),
    Section("[tests]", "tests", ((STATS_PARAMS, StatsSpec),),
            "Which tests to run: `distsim.config.sections.StatsSpec`. Optional section.",
            (StatsSpec,)),
    Section("[pairs]", "pairs", ((PAIR_PARAMS, PairSpec),),
            "All-pairs distances and nearest neighbours: `distsim.config.sections.PairSpec`. "
            "Optional section. `top_k` is cut to the models per arch minus one in a smaller "
            "zoo.", (PairSpec,)),
)


def toml_value(value: Any) -> str:
    """A default as it would be written in the study file."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, (tuple, list)):
        items = ", ".join(toml_value(v).strip("`") for v in value)
        return f"`[{items}]`"
    return f"`{value!r}`"


def escape(text: str) -> str:
    """Plain text inside a Markdown table cell."""
    return re.sub(r"([\\`*_{}\[\]<>|])", r"\\\1", text)


def default_of(section: str, key: str, cls: type | None) -> str:
    where = f"{section}.{key}"
    if where in LOADER_DEFAULTS:
        return LOADER_DEFAULTS[where]
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
    if key not in fields:
        raise KeyError(f"docs hook: no default known for {where}; add it to LOADER_DEFAULTS")
    field = fields[key]
    if field.default is not dataclasses.MISSING:
        return toml_value(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return toml_value(field.default_factory())
    return "required"


def docstring_markdown(cls: type | None) -> str:
    """A section dataclass's docstring as Markdown: its first paragraph, then a list with one
    item per "key: what it is" line (continuation lines joined)."""
    doc = inspect.getdoc(cls) if cls is not None else None
    if not doc:
        return ""
    doc = re.sub(r"``([^`]+)``", r"`\1`", doc)
    first, _, rest = doc.partition("\n\n")
    out = [" ".join(first.split())]
    items: list[str] = []
    for line in rest.splitlines():
        if re.match(r"^[a-z_*][\w*, ]*: ", line):
            items.append(line.strip())
        elif line.strip() and items:
            items[-1] += " " + line.strip()
        elif line.strip():
            out.append(line.strip())
    if items:
        out.append("\n".join(f"- {item}" for item in items))
    text = "\n\n".join(out)
    parts = text.split("`")  # outside code spans, "<arch name>" is text, not an HTML tag
    return "`".join(p.replace("<", "&lt;") if i % 2 == 0 else p for i, p in enumerate(parts))


def study_keys() -> str:
    parts: list[str] = []
    for sec in SECTIONS:
        parts.append(f"## `{sec.heading}`\n\n{sec.intro}\n")
        rows = ["| key | accepts | default |", "|---|---|---|"]
        for table, cls in sec.tables:
            for key, constraint in table.items():
                if key in NOT_KEYS.get(sec.prefix, ()):
                    continue
                rows.append(f"| `{key}` | {escape(constraint.describe())} | "
                            f"{default_of(sec.prefix, key, cls)} |")
        parts.append("\n".join(rows) + "\n")
        for cls in sec.documented:
            text = docstring_markdown(cls)
            if text:
                parts.append(f"From the docstring of `{cls.__name__}`:\n\n{text}\n")
    return "\n".join(parts)


def cli() -> str:
    import typer
    from typer.cli import get_docs_for_click

    from distsim.cli import app

    command = typer.main.get_command(app)
    text = get_docs_for_click(obj=command, ctx=typer.Context(command, info_name="distsim"),
                              name="distsim", title="`distsim`")
    out, fenced = [], False
    for line in text.splitlines():  # one level below the page's title
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if line.startswith("#") and not fenced else line)
    return "\n".join(out)


def store_tables() -> str:
    from distsim.store.tables import markdown_table

    return markdown_table()


GENERATORS: dict[str, Callable[[], str]] = {
    "study-keys": study_keys,
    "cli": cli,
    "store-tables": store_tables,
}

ROLE = re.compile(r":(?:class|mod|func|meth|attr|data|exc|obj):<code>~?([^<]*?)</code>")


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    def render(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise KeyError(f"docs hook: unknown generated block {name!r}")
        return GENERATORS[name]().rstrip("\n")

    return MARKER.sub(render, markdown)


def on_page_content(html: str, **kwargs: Any) -> str:
    """Sphinx roles left in docstrings shown as plain code: :class:`~a.b.C` as `C`,
    :mod:`a.b` as `a.b`."""

    def code(match: re.Match[str]) -> str:
        name = match.group(1)
        short = "~" in match.group(0)
        return f"<code>{name.rsplit('.', 1)[-1] if short else name}</code>"

    return ROLE.sub(code, html)
