"""The relay server: one libp2p host serving circuit relay v2 HOP under limits and the mailbox."""

import gc
import json
import signal
from collections.abc import Sequence
from pathlib import Path

import trio

from relay.circuit import CircuitLimits, relay_host
from relay.errors import MailboxStoreError
from relay.key import load_or_create_seed
from relay.mailbox_service import ServiceConfig, serve_mailbox, sweep_expired
from relay.mailbox_store import MailboxStore, StoreLimits

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)  # `python -m relay`, for tests and benches
RELAY_LISTEN = ("/ip4/0.0.0.0/tcp/4001",)  # `aico-node relay`: a fixed port devices can be configured with


async def open_mailbox_store(location: str | None, data_dir: Path, limits: StoreLimits | None = None) -> MailboxStore:
    """The store at `location`: None for SQLite in `data_dir`, else comma-separated nats:// URLs of one cluster."""
    if location is None:
        from relay.mailbox_sqlite import SqliteMailboxStore

        return await SqliteMailboxStore.open(data_dir, limits)
    urls = [url.strip() for url in location.split(",") if url.strip()]
    if not urls or any(not url.startswith(("nats://", "tls://")) for url in urls):
        raise MailboxStoreError(f"--mailbox-store takes nats:// URLs separated by commas, got {location!r}")
    # Imported here: only a relay on JetStream needs the NATS client.
    from relay.mailbox_jetstream import JetStreamMailboxStore

    return await JetStreamMailboxStore.open(urls, limits)


async def run_relay(
    listen_addrs: Sequence[str],
    data_dir: Path,
    circuit_limits: CircuitLimits = CircuitLimits(),
    store_limits: StoreLimits | None = None,
    service_config: ServiceConfig | None = None,
    mailbox_store: str | None = None,
) -> None:
    """Serve circuits and the mailbox on `listen_addrs`, print the ready line, and stop on SIGINT or SIGTERM; the
    mailbox is in `data_dir`, or in the JetStream cluster at `mailbox_store` (nats:// URLs separated by commas)."""
    store = await open_mailbox_store(mailbox_store, data_dir, store_limits)
    try:
        async with relay_host(listen_addrs, circuit_limits, seed=load_or_create_seed(data_dir)) as relay:
            serve_mailbox(relay.libp2p_host, store, service_config)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sweep_expired, store)
                # Measured (bench_mailbox): full collections walked every object libp2p and its imports leave alive
                # and paused the relay, its commits included, for 65-140 ms. Frozen, they are never walked again.
                gc.freeze()
                print(json.dumps({"addresses": relay.addresses, "peer_id": relay.peer_id}), flush=True)
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
                nursery.cancel_scope.cancel()
    finally:
        await store.close()
