"""A fleet of relay processes on one real 3-server JetStream cluster, on loopback: a device posts through one relay
and another drains through a second after a NATS server died; a relay killed mid-put loses no acknowledged item;
all NATS servers down makes a put a retryable refusal, and puts work again once they are back."""

import os
import signal

import pytest
import trio

from relay.errors import MailboxReason, MailboxRefused, RelayError
from relay.mailbox_jetstream import JetStreamMailboxStore
from simulations.nats_cluster import NatsCluster
from tests.processes import RunningNode, cli, pair, wait_until
from tests.relay.test_mailbox_service import KEYS, client, device
from tests.test_mailbox_processes import RunningRelay

RECOVERY_TIMEOUT_S = 30.0
WRITERS = 4  # sessions putting at once, so puts are in flight when the relay dies


@pytest.fixture
def cluster(tmp_path):
    """A cluster of this test's own: these tests stop and kill its servers."""
    cluster = NatsCluster(tmp_path / "nats").start()
    yield cluster
    cluster.stop()


def test_a_device_posts_through_one_relay_and_another_drains_through_a_second_after_a_nats_server_died(
    cluster, tmp_path
):
    store = ",".join(cluster.urls)
    relays = [RunningRelay(tmp_path / f"relay{i}", mailbox_store=store) for i in (1, 2)]
    try:
        assert cli(tmp_path / "a", "init").returncode == 0
        a = RunningNode(tmp_path / "a", relay=relays[0].address)
        try:
            assert pair(a, tmp_path / "b").returncode == 0
            for i in range(30):
                a.call("msg.add", conversation="fleet", text=f"secret message {i}")

            def all_posted() -> bool:
                status = a.call("status")
                return status["relay"]["posted_seq"] >= status["ops"] and status["relay"]["last_error"] is None

            wait_until(all_posted, 60, "a to post every op through relay 1")
            digest = a.call("digest")
        finally:
            a.stop()
        cluster.stop_server(0, signal.SIGKILL)
        # b knows no address of a, and only relay 2: the mailbox on the cluster is its only way.
        b = RunningNode(tmp_path / "b", relay=relays[1].address)
        try:
            wait_until(lambda: b.call("status")["stores"]["messages"] == 30, 60, "b to drain all 30 through relay 2")
            wait_until(lambda: b.call("digest") == digest, 30, "b to hold exactly what a held")
            assert b.call("status")["relay"]["last_error"] is None
        finally:
            b.stop()
    finally:
        for relay in relays:
            relay.stop()
    cluster.stop()
    files = [path for folder in cluster.store_dirs for path in folder.rglob("*") if path.is_file()]
    stored = b"".join(path.read_bytes() for path in files)
    assert len(stored) > 30 * 100  # the stream's files hold the sealed batches...
    assert b"secret message" not in stored and b"fleet" not in stored  # ...and nothing readable


@pytest.mark.trio
async def test_a_relay_killed_mid_put_loses_no_acknowledged_item(cluster, tmp_path):
    relay = RunningRelay(tmp_path / "relay", mailbox_store=",".join(cluster.urls))
    acknowledged: dict[int, bytes] = {}
    enough = trio.Event()

    async def write(host) -> None:
        async with client(host, relay.address) as mailbox:
            with pytest.raises(RelayError):  # the relay dies under the session, puts in flight
                while True:
                    blob = os.urandom(512)
                    acknowledged[await mailbox.put(KEYS, blob)] = blob
                    if len(acknowledged) >= 100:
                        enough.set()

    try:
        async with device() as host, trio.open_nursery() as nursery:
            for _ in range(WRITERS):
                nursery.start_soon(write, host)
            with trio.fail_after(RECOVERY_TIMEOUT_S):
                await enough.wait()
            relay.stop(signal.SIGKILL)
    finally:
        relay.stop()
    store = await JetStreamMailboxStore.open(cluster.urls)
    try:
        items, more = await store.fetch(KEYS.mailbox_id, 0, 1000, 4 << 20)
    finally:
        await store.close()
    stored = {item.cursor: item.blob for item in items}
    assert not more and {cursor: stored.get(cursor) for cursor in acknowledged} == acknowledged


@pytest.mark.trio
async def test_with_every_nats_server_down_a_put_is_refused_as_unavailable_then_works_when_they_return(
    cluster, tmp_path
):
    relay = RunningRelay(tmp_path / "relay", mailbox_store=",".join(cluster.urls))
    try:
        async with device() as host:
            async with client(host, relay.address) as mailbox:
                before = [await mailbox.put(KEYS, f"before {i}".encode()) for i in range(5)]
                cluster.stop()
                for _ in range(10):
                    with pytest.raises(MailboxRefused) as refused:
                        await mailbox.put(KEYS, b"while down")
                    assert refused.value.reason is MailboxReason.UNAVAILABLE
                cluster.start()
                with trio.fail_after(RECOVERY_TIMEOUT_S):
                    while True:
                        try:
                            after = await mailbox.put(KEYS, b"after")
                            break
                        except MailboxRefused as refusal:
                            assert refusal.reason is MailboxReason.UNAVAILABLE
                            await trio.sleep(0.1)
                items, _ = await mailbox.fetch(KEYS)
    finally:
        relay.stop()
    assert [item.cursor for item in items][:5] == before and items[-1].cursor == after
    assert [item.blob for item in items][:5] == [f"before {i}".encode() for i in range(5)]
    # One warning for the loss of NATS and one for its return, however many puts it refused.
    log = relay.log.read_text()
    assert log.count("NATS does not answer") == 1 and log.count("NATS answers again") == 1, log
