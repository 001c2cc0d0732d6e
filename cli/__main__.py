"""`python -m cli`: the `aico-node` command line."""

from cli import main

main()
