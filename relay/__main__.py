"""`python -m relay`: the relay server (circuit relay HOP and mailbox); prints {"addresses": [...]} once ready."""

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

import trio

from relay.server import DEFAULT_LISTEN, run_relay


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m relay", description=__doc__)
    parser.add_argument("--listen", action="append", help="multiaddr to listen on (repeatable)")
    parser.add_argument("--data", type=Path, required=True, help="folder for the relay key and the mailbox store")
    parser.add_argument("--mailbox-store", help="nats:// URLs (comma-separated) of a JetStream cluster for the mailbox")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        trio.run(partial(run_relay, args.listen or list(DEFAULT_LISTEN), args.data, mailbox_store=args.mailbox_store))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
