"""The `aico-node` command line: the only package that imports node, relay and simulations together."""

import os

from cli import data, lifecycle, tools  # noqa: F401  (each registers its commands on the app)
from cli.common import app


def main() -> None:
    """Run the `aico-node` command line."""
    os.umask(0o077)  # every file the node writes in its home is the owner's alone
    app()
