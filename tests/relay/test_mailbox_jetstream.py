"""What only the JetStream store does, on real nats-server clusters: quotas held exactly by several relays putting
into one mailbox at once, one stream shared only by relays with the same limits, and any one server of three lost
without a put or a fetch failing."""

import itertools
import os
import signal
import socket

import attrs
import pytest
import trio

from relay.errors import MailboxReason, MailboxRefused, MailboxStoreError
from relay.mailbox_jetstream import JetStreamMailboxStore
from relay.mailbox_store import StoreLimits
from simulations.nats_cluster import NatsCluster
from tests.relay.test_mailbox_store import TEST_STREAM_BYTES_MAX

BOX = b"j" * 16
RELAYS = 3
pytestmark = pytest.mark.trio
_streams = itertools.count()


def stream_name() -> str:
    return f"J{os.getpid()}_{next(_streams)}"


@pytest.mark.parametrize(
    "limits, accepted",
    [({"mailbox_bytes_max": 1000}, 10), ({"mailbox_items_max": 7}, 7)],
    ids=["bytes", "items"],
)
async def test_relays_putting_into_one_mailbox_at_once_never_pass_its_quota_together(nats_cluster, limits, accepted):
    stream = stream_name()
    store_limits = StoreLimits(total_bytes_max=TEST_STREAM_BYTES_MAX, **limits)
    stores = [await JetStreamMailboxStore.open(nats_cluster.urls, store_limits, stream=stream) for _ in range(RELAYS)]
    outcomes: list[int | MailboxReason] = []

    async def put_from(store: JetStreamMailboxStore) -> None:
        for _ in range(10):
            try:
                outcomes.append(await store.put(BOX, os.urandom(100)))
            except MailboxRefused as refused:
                outcomes.append(refused.reason)

    async with trio.open_nursery() as nursery:
        for store in stores:
            nursery.start_soon(put_from, store)
    cursors = sorted(outcome for outcome in outcomes if isinstance(outcome, int))
    assert len(cursors) == accepted and outcomes.count(MailboxReason.QUOTA_EXCEEDED) == 10 * RELAYS - accepted
    items, more = await stores[0].fetch(BOX, 0, 1000, 1 << 20)
    assert [item.cursor for item in items] == cursors and not more
    for store in stores:
        await store.close()


async def test_a_relay_with_other_limits_than_the_stream_is_refused(nats_cluster):
    stream = stream_name()
    limits = StoreLimits(total_bytes_max=TEST_STREAM_BYTES_MAX)
    first = await JetStreamMailboxStore.open(nats_cluster.urls, limits, stream=stream)
    with pytest.raises(MailboxStoreError, match="same limits"):
        other = attrs.evolve(limits, mailbox_bytes_max=1 << 20)
        await JetStreamMailboxStore.open(nats_cluster.urls, other, stream=stream)
    await first.close()


async def test_unreachable_servers_are_a_clear_error_at_open(tmp_path):
    cluster = NatsCluster(tmp_path)  # never started: nothing listens on its ports
    with pytest.raises(MailboxStoreError, match="cannot reach"):
        await JetStreamMailboxStore.open(cluster.urls)


async def test_a_new_cluster_moves_to_other_ports_when_one_chosen_for_it_was_taken(tmp_path):
    cluster = NatsCluster(tmp_path)
    with socket.socket() as squatter:  # takes a route port after it was chosen, before its server binds it
        squatter.bind(("127.0.0.1", cluster.servers[2].route_port))
        squatter.listen()
        taken = cluster.servers[2].route_port
        cluster.start()
        try:
            assert cluster.servers[2].route_port != taken and all(server.healthy() for server in cluster.servers)
        finally:
            cluster.stop()


async def test_any_one_server_of_three_lost_keeps_puts_and_fetches_working(tmp_path):
    cluster = NatsCluster(tmp_path).start()
    store = await JetStreamMailboxStore.open(cluster.urls)
    try:
        put = [await store.put(BOX, b"before")]
        # Each server in turn, so one of them leads the stream when it dies and a new leader is elected.
        for index in range(len(cluster.servers)):
            cluster.stop_server(index, signal.SIGKILL)
            put.append(await store.put(BOX, f"without server {index}".encode()))
            items, more = await store.fetch(BOX, 0, 1000, 1 << 20)
            assert [item.cursor for item in items] == put and not more
            cluster.start_server(index)
        assert [item.blob for item in items] == [b"before", *(f"without server {i}".encode() for i in range(3))]
    finally:
        await store.close()
        cluster.stop()
