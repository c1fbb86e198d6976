"""The report's one HTML page: inline CSS, relative links to its PNGs, no script, no network.

The page is built from plain data (:class:`Page`) so that what it says is testable without
drawing anything: every value shown is escaped, every number of the tests grid also sits,
unrounded, in the row's ``data-*`` attributes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

Q_LEVEL = 0.05  # grid rows with q below it are highlighted

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1d2329;margin:0;
 background:#f4f5f7;font-size:14px;line-height:1.4}
main{max-width:1360px;margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:21px;margin:36px 0 8px;padding-top:8px;
 border-top:2px solid #d0d5db}h3{font-size:16px;margin:22px 0 6px}
table{border-collapse:collapse}td,th{padding:3px 8px;text-align:left;vertical-align:top}
.facts td:first-child{color:#5b6670;padding-left:0}
.counts th,.counts td,.stages th,.stages td{border-bottom:1px solid #e3e6ea}
.counts td.n,.stages td.n{text-align:right;font-variant-numeric:tabular-nums}
.wide{overflow-x:auto}.grid{margin:6px 0 4px}.grid>tbody>tr>th,.grid>thead>tr>th{background:#eef1f4;
 border:1px solid #d0d5db}.grid>tbody>tr>td{border:1px solid #d0d5db;padding:2px}
.t{font-size:11.5px;font-variant-numeric:tabular-nums;width:100%}
.t td{padding:1px 2px;text-align:right;white-space:nowrap}.t td:first-of-type{text-align:left}
.t th{font-weight:normal;color:#5b6670;font-size:11px;text-align:right;padding:0 3px}
.t tr.sig td,.t tr.sig th{background:#dff3e3}
.t th.e{font-weight:bold;color:#1d2329;text-align:right;padding:1px 2px}
.legend,.note{color:#4a545e;font-size:13px;margin:4px 0}.note{font-style:italic}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.figs img{max-width:100%;height:auto;border:1px solid #e3e6ea}
.empty{color:#7b8794;font-style:italic}nav a{margin-right:14px}
pre{background:#f6f8fa;border:1px solid #e3e6ea;padding:10px;font-size:12px;overflow:auto;
 columns:3 320px;white-space:pre-wrap}
"""

_LEGEND = (
    "Each cell: the tests of one layer x method. <b>effect</b>: the effect size to compare "
    "across methods, layers and factors: closed-set accuracy - chance, open-set mAP - chance, "
    "permanova and permdisp R^2 (the share of the spread the groups explain; a multi-factor "
    "permanova adds its partial R^2 after the slash, SS_term / (SS_term + SS_residual)). "
    "<b>obs.</b>: the statistic on the true task "
    "labels (closed-set: accuracy of held-out models; open-set: retrieval of held-out tasks, "
    "mAP or CMC; permanova: pseudo-F, do the task centroids differ; permdisp: F, do the "
    "task spreads differ; the null figures name each statistic); <b>chance</b>: its exact "
    "value under random labels (- where none); <b>p</b>: permutation p-value (floor "
    "1/(1+B)); <b>q</b>: Benjamini-Hochberg over the {n} tests of the store; green: "
    "q &lt; {level}."
)


@dataclass(frozen=True)
class Image:
    """A PNG of the page: its path relative to the page and what it shows."""

    src: str
    alt: str


@dataclass(frozen=True)
class MethodSection:
    """The figures of one arch x method and the notes that go with them (e.g. sampling)."""

    method: str
    images: list[Image]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ArchSection:
    """One architecture: its layers and methods (grid order), its tests (rows of the tests
    table with q_value and distsim.report.effects' columns, as dicts; of a study with epochs the
    last epoch's), a section per method and its along-training figure (or why there is none;
    nothing for a study without epochs)."""

    arch: str
    layers: list[str]
    methods: list[str]
    tests: list[dict[str, Any]]
    sections: list[MethodSection]
    training: list[Image | str] = field(default_factory=list)  # the along-training figure


@dataclass(frozen=True)
class Page:
    """Everything the page shows, as data: header facts, model counts, tasks, the zoo's
    figures (an Image or a sentence), the architectures, stage markers and the config."""

    title: str
    facts: list[tuple[str, str]]
    counts: list[dict[str, Any]]
    tasks: list[tuple[int, str]]
    zoo: list[Image | str]
    archs: list[ArchSection]
    stages: Mapping[str, Mapping[str, Any]]
    config: Mapping[str, Any]
    n_tests: int


def number(value: Any, digits: int = 3) -> str:
    """A grid number: `digits` decimals, "-" for None or nan."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def render(page: Page) -> str:
    """The whole HTML document of `page`."""
    nav = " ".join(f'<a href="#arch-{escape(a.arch)}">{escape(a.arch)}</a>' for a in page.archs)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(page.title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{escape(page.title)}</h1>", _facts(page.facts), _counts(page.counts),
        f'<nav>Sections: <a href="#zoo">zoo</a> {nav} <a href="#study">study</a></nav>',
        '<h2 id="zoo">The zoo</h2>', _tasks(page.tasks),
        *(_image(z) if isinstance(z, Image) else f'<p class="empty">{escape(z)}</p>'
          for z in page.zoo),
        *(_arch(a, page.n_tests) for a in page.archs),
        '<h2 id="study">The study</h2>', "<h3>Stages</h3>", _stages(page.stages),
        "<h3>Config (study.json, resolved)</h3>",
        f"<pre>{escape(toml_text(page.config))}</pre>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _facts(facts: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def _counts(counts: Sequence[dict[str, Any]]) -> str:
    if not counts:
        return '<p class="empty">no models in this store</p>'
    cols = ["arch", "expected", "ok", "diverged", "failed", "features", "tests"]
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"n" if c != "arch" else ""}">{escape(str(r.get(c, "")))}'
                         "</td>" for c in cols) + "</tr>" for r in counts)
    return (f'<h3>Models per architecture</h3><table class="counts"><tr>{head}</tr>{body}'
            "</table>")


def _tasks(tasks: Sequence[tuple[int, str]]) -> str:
    if not tasks:
        return ""
    shown = ", ".join(f"{t} = {escape(name)}" for t, name in tasks[:60])
    more = f" and {len(tasks) - 60} more" if len(tasks) > 60 else ""
    return f'<p class="legend">Tasks: {shown}{more}.</p>'


def _image(img: Image) -> str:
    return f'<img src="{escape(img.src)}" alt="{escape(img.alt)}">'


def _arch(a: ArchSection, n_tests: int) -> str:
    out = [f'<h2 id="arch-{escape(a.arch)}">Architecture {escape(a.arch)}</h2>']
    if a.tests:
        out.append(f'<p class="legend">{_LEGEND.format(n=n_tests, level=Q_LEVEL)}</p>')
        epochs = [r["epoch"] for r in a.tests if r.get("epoch") is not None]
        if epochs:
            out.append(f'<p class="legend">The grid tests the checkpoints of epoch {max(epochs)}'
                       ", the last saved; every saved epoch: the figure along training below."
                       "</p>")
        factors = list(dict.fromkeys(r.get("factor") for r in a.tests))
        for factor in factors:
            if factors != [None]:
                name = f"factor {factor}" if factor is not None else "the study's grouping"
                out.append(f"<h3>{escape(a.arch)}: {escape(name)}</h3>")
            out.append(_grid(a, [r for r in a.tests if r.get("factor") == factor]))
    else:
        out.append('<p class="empty">no tests of this architecture in the store yet</p>')
    if a.training:
        out.append(f"<h3>{escape(a.arch)} along training</h3>")
        out += [_image(z) if isinstance(z, Image) else f'<p class="empty">{escape(z)}</p>'
                for z in a.training]
    for s in a.sections:
        out.append(f"<h3>{escape(a.arch)} / {escape(s.method)}</h3>")
        out += [f'<p class="note">{escape(n)}</p>' for n in s.notes]
        out.append('<div class="figs">' + "".join(_image(i) for i in s.images) + "</div>")
    return "\n".join(out)


def _grid(a: ArchSection, tests: Sequence[dict[str, Any]]) -> str:
    cell: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in tests:
        cell.setdefault((r["layer"], r["method"]), []).append(r)
    head = "<tr><th>layer \\ method</th>" + "".join(
        f"<th>{escape(m)}</th>" for m in a.methods) + "</tr>"
    rows = []
    for layer in a.layers:
        tds = "".join(f"<td>{_cell(cell.get((layer, m), []))}</td>" for m in a.methods)
        rows.append(f"<tr><th>{escape(layer)}</th>{tds}</tr>")
    return (f'<div class="wide"><table class="grid"><thead>{head}</thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _observed(value: Any) -> str:
    """A statistic in the grid: 3 decimals, 1 from 100 on (a pseudo-F of 1903.1 says enough and
    keeps five method columns within the page)."""
    big = isinstance(value, (int, float)) and math.isfinite(value) and abs(value) >= 100
    return number(value, 1 if big else 3)


def _cell(tests: Sequence[dict[str, Any]]) -> str:
    if not tests:
        return '<span class="empty">no tests</span>'
    head = ("<tr><th>effect</th><th></th><th>obs.</th><th>chance</th><th>p</th><th>q</th>"
            "</tr>")
    rows = []
    for r in tests:
        q = r.get("q_value")
        sig = ' class="sig"' if q is not None and math.isfinite(q) and q < Q_LEVEL else ""
        data = " ".join(
            f'data-{k}="{escape(str(r.get(col)))}"' for k, col in (
                ("arch", "arch"), ("layer", "layer"), ("method", "method"),
                ("protocol", "protocol"), ("factor", "factor"), ("epoch", "epoch"),
                ("effect", "effect"), ("partial-r2", "partial_r2"), ("observed", "observed"),
                ("chance", "chance"), ("p", "p_value"), ("q", "q_value")))
        rows.append(
            f'<tr{sig} {data}>{_effect(r)}'
            f'<td title="{escape(str(r.get("statistic") or ""))}">{escape(r["protocol"])}</td>'
            f'<td>{_observed(r.get("observed"))}</td><td>{number(r.get("chance"))}</td>'
            f'<td>{number(r.get("p_value"), 4)}</td><td>{number(q, 4)}</td></tr>')
    return f'<table class="t">{head}{"".join(rows)}</table>'


def _effect(r: Mapping[str, Any]) -> str:
    """The cell's leading number: the row's effect size (and partial R^2 where it has one)."""
    text, name, partial = number(r.get("effect")), r.get("effect_name"), r.get("partial_r2")
    if partial is not None:
        text, name = f"{text} / {number(partial)}", f"{name} / partial R^2"
    return f'<th class="e" title="{escape(str(name or "no effect size"))}">{text}</th>'


def _stages(stages: Mapping[str, Mapping[str, Any]]) -> str:
    if not stages:
        return '<p class="empty">no stage markers in this store (_stages/)</p>'
    order = sorted(stages.items(), key=lambda kv: str(kv[1].get("finished", "")))
    rows = []
    for name, info in order:
        seconds = info.get("seconds")
        other = ", ".join(f"{k} {v}" for k, v in sorted(info.items())
                          if k not in ("stage", "finished", "seconds"))
        rows.append(f"<tr><td>{escape(name)}</td><td>{escape(str(info.get('finished', '')))}"
                    f'</td><td class="n">{escape(number(seconds, 1))}</td>'
                    f"<td>{escape(other)}</td></tr>")
    total = sum(float(i.get("seconds") or 0) for i in stages.values())
    return ('<table class="stages"><tr><th>stage</th><th>finished (UTC)</th><th>seconds</th>'
            f'<th>what it did</th></tr>{"".join(rows)}<tr><td>all</td><td></td>'
            f'<td class="n">{number(total, 1)}</td><td>(the last launch that ran each stage)'
            "</td></tr></table>")


def toml_text(config: Mapping[str, Any]) -> str:
    """A resolved study config as TOML-like text in the study file's section order: [section],
    [[arch]], [section.sub] tables, values as JSON literals (None shown as a comment: TOML has
    no null)."""
    lines: list[str] = []

    def table(path: str, body: Mapping[str, Any], array: bool = False) -> None:
        lines.append(f"[[{path}]]" if array else f"[{path}]")
        subs = []
        for k, v in body.items():
            if isinstance(v, Mapping):
                subs.append((k, v))
            elif v is None:
                lines.append(f"# {k} = (unset)")
            else:
                lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
        for k, v in subs:
            table(f"{path}.{k}", v)

    first = ("study", "data", "arch", "train", "resources", "features", "tests", "pairs")
    order = [k for k in first if k in config] + [k for k in config if k not in first]
    for name in order:
        value = config[name]
        if isinstance(value, Mapping):
            table(name, value)
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                table(name, item, array=True)
        else:
            lines.append(f"{name} = {json.dumps(value)}")
    return "\n".join(lines).rstrip() + "\n"
