"""The ``distsim`` command line: validate and launch studies, query, report and export their
stores.

    distsim validate STUDY.toml
    distsim launch STUDY.toml [--address ADDR] [--stages zoo,features,pairs,tests] [--fresh]
                  [--yes] [--partial]
    distsim status STORE
    distsim verify STORE
    distsim report STORE [--out DIR]
    distsim export STORE (--model ID ... | --arch NAME) --out DIR
    distsim query models|tests|neighbors|history STORE [--arch ..] [--task ..] [--layer ..]
                  [--method ..] [--protocol ..] [--status ..] [--model ..] [--limit N]
                  [--format table|csv|json]
    distsim query tables
    distsim query sql STORE "SELECT ... FROM models ..."
    distsim --version | -h

STORE is a store folder or a study TOML (whose study.store is used). User errors (any
distsim.errors.DistsimError: bad study file, changed study, unknown table; bad SQL) print one
line on stderr and exit with code 2; a launch whose units failed after their retries exits 1;
Ctrl-C / SIGTERM exit 130 / 143. Only ``launch`` imports Ray; ``query`` and ``verify`` on a
store folder import neither Ray nor torch, so they answer fast.
"""

from distsim.cli import query  # noqa: F401  (registers the query subcommands)
from distsim.cli.common import app
from distsim.cli.store import export, report, status, verify
from distsim.cli.study import launch, validate

for command in (validate, launch, status, verify, report, export):  # the order -h lists them
    app.command()(command)

__all__ = ["app"]
