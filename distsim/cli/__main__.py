"""``python -m distsim.cli``: the distsim command."""

from distsim.cli import app

app()
