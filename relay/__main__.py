"""`python -m relay`: a mailbox relay on a libp2p host; prints {"addresses": [...]} once ready."""

import argparse
import json
import logging
import sys
from pathlib import Path

import trio

from relay.host import load_or_create_seed, running_host
from relay.mailbox_service import serve_mailbox, sweep_expired
from relay.mailbox_store import MailboxStore


async def run_relay(listen_addrs: list[str], data_dir: Path) -> None:
    """Serve the mailbox from `data_dir` on `listen_addrs` until cancelled."""
    store = await MailboxStore.open(data_dir)
    try:
        async with running_host(load_or_create_seed(data_dir), listen_addrs) as host:
            serve_mailbox(host, store)
            print(json.dumps({"addresses": [str(addr) for addr in host.get_addrs()]}), flush=True)
            await sweep_expired(store)
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m relay", description=__doc__)
    parser.add_argument("--listen", action="append", help="multiaddr to listen on (repeatable)")
    parser.add_argument("--data", type=Path, required=True, help="folder for the relay key and the mailbox store")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        trio.run(run_relay, args.listen or ["/ip4/127.0.0.1/tcp/0"], args.data)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
