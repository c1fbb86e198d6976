"""House rules kept by tests: small modules that say their idea, docs that match the code."""

from __future__ import annotations

import ast
import importlib
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


def test_readme_table_section_is_the_table_contract() -> None:
    assert markdown_table() in (ROOT / "README.md").read_text()


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
