"""House rules kept by tests: small modules that say their idea, docs that match the code."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distsim.config.arch import ArchConfig
from distsim.store.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / "distsim").rglob("*.py"))
MAX_LINES = 560  # "about 550": a module past this wants splitting by idea


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_module_is_small_and_its_first_line_says_its_idea(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{path.name}: {len(text.splitlines())} lines"
    doc = ast.get_docstring(ast.parse(text))
    assert doc and doc.splitlines()[0].strip(), f"{path.name} has no docstring"
    assert "DESIGN.md" not in text, f"{path.name} cites a file outside the repository"


def test_architecture_doc_lists_every_module_and_no_other() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_/]+\.py)` \|", doc, flags=re.MULTILINE))
    present = {str(p.relative_to(ROOT / "distsim")) for p in MODULES}
    assert present - listed == set(), "modules missing from docs/architecture.md"
    assert listed - present == set(), "docs/architecture.md names modules that do not exist"


def test_docs_store_page_renders_the_table_contract() -> None:
    """The docs' store reference is generated from store/tables.py by the mkdocs hook."""
    spec = importlib.util.spec_from_file_location("docs_hook", ROOT / "docs/hooks/reference.py")
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = hook  # its dataclasses look their module up there
    spec.loader.exec_module(hook)
    page = (ROOT / "docs/reference/store.md").read_text()
    assert markdown_table() in hook.on_page_markdown(page)


FRONT = ("distsim.config", "distsim.store", "distsim.cli", "distsim.summary", "distsim.results",
         "distsim.report", "distsim.export", "distsim.stats", "distsim.stats.multiple_testing")
HEAVY = ("torch", "scipy.optimize", "numba", "ray")


def test_the_front_imports_no_torch_numba_scipy_optimize_or_ray() -> None:
    """The config, store, CLI, summary, report and Python API load in a fresh interpreter without
    the science's heavy libraries (they are imported inside the functions that need them)."""
    code = (f"import sys\nimport {', '.join(FRONT)}\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_stats_names_are_lazy_and_each_resolves() -> None:
    import distsim.stats as stats

    assert set(stats.__all__) == set(stats._MODULES)
    for name in stats.__all__:
        assert getattr(stats, name) is getattr(importlib.import_module(stats._MODULES[name]), name)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = stats.no_such_name


ARCHS = [ArchConfig(kind="mlp", widths=(3,)), ArchConfig(kind="mlp", widths=(4, 3, 2)),
         ArchConfig(kind="cnn", channels=(2,)), ArchConfig(kind="cnn", channels=(2, 3),
                                                           head_widths=(5, 4)),
         ArchConfig(kind="cnn", channels=(2,), input_shape=(1, 16)),
         ArchConfig(kind="rnn", hidden=4), ArchConfig(kind="rnn", hidden=4, num_layers=3)]


@pytest.mark.parametrize("arch", ARCHS, ids=[f"{a.kind}{i}" for i, a in enumerate(ARCHS)])
def test_config_feature_layers_are_the_chain_walks_layers(arch: ArchConfig) -> None:
    """The torch-free ArchConfig.feature_layers (what the config validates against) names the
    layers of the chain's walk of the built model."""
    from distsim.weights.features import feature_layers

    assert arch.feature_layers() == tuple(feature_layers(arch))


SCIENCE = ("torch", "numba", "scipy.optimize")


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.parametrize("command", ["validate --no-data", "status", "verify", "query tests",
                                     "report"],
                         ids=lambda c: c.replace(" ", "-"))
def test_read_commands_on_a_finished_store_import_no_science(finished_study: Path,
                                                             tmp_path: Path,
                                                             command: str) -> None:
    """`distsim validate --no-data` (with its data, validate loads scikit-learn's digits, and
    scikit-learn imports scipy), `status`, `verify` and `query tests` on the session's finished
    store, each in a fresh interpreter, load neither torch, numba nor scipy.optimize; `report`
    loads numba (its distance heatmaps call distsim.stats.distances, which imports numba when a
    figure is drawn) but neither torch nor scipy.optimize."""
    if command.startswith("validate"):
        args = ["validate", str(finished_study), "--no-data"]
    else:
        args = [*command.split(), str(finished_study.parent / "store")]
    if command == "report":
        args += ["--out", str(tmp_path / "report")]  # not beside the shared store
    code = ("import sys\nfrom distsim.cli import app\n"
            f"code = app({args!r}, standalone_mode=False)\n"
            f"print('\\n@', code, *(m for m in {SCIENCE!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.splitlines()[-1].split()
    assert last[:2] == ["@", "None"], proc.stdout[-3000:]  # exit code 0
    loaded = set(last[2:])
    if command == "report":
        assert (tmp_path / "report" / "index.html").is_file()
        assert loaded <= {"numba"}, loaded
    else:
        assert loaded == set(), loaded
