"""`bench relay`: two nodes syncing through a relay process against the direct path, and the mailbox against a relay
in its own process, on SQLite and on a 3-server JetStream cluster (replicas 3), all over loopback, beside same-run
baselines."""

import json
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from node.net.dial import dial_protocol
from node.net.host import P2pHost, p2p_host
from node.trust.identity import DeviceIdentity
from relay.mailbox_client import MAILBOX_PROTOCOL, MailboxClient
from relay.mailbox_jetstream import JetStreamMailboxStore
from relay.mailbox_keys import MailboxKeys, mailbox_keys
from relay.mailbox_protocol import FETCH_ITEMS_MAX, FETCH_REPLY_BYTES_MAX
from relay.mailbox_sqlite import SqliteMailboxStore
from relay.mailbox_store import MailboxStore
from simulations.bench_sync import (
    CATCH_UP_OPS,
    NodeProcess,
    _catch_up,
    _CatchUp,
    _live_latency,
    _LiveLatency,
    _paired_homes,
)
from simulations.metrics import Metric, metric, rss_mib
from simulations.nats_cluster import NatsCluster

BATCHES = 10_000
BATCH_BYTES = 1024
WRITERS = 10  # concurrent sessions sharing the 10k puts, one mailbox each
CONCURRENT_CLIENTS = 100
PUTS_PER_CONCURRENT_CLIENT = 20
# Offered load of the paced run: each mailbox puts one batch every PUT_INTERVAL_MS, i.e. 100 x 4/s = 400 puts/s,
# well under what one relay sustains here (~1000 puts/s saturated), as devices put when they change something.
PUT_INTERVAL_MS = 250
PACED_PUTS_PER_CLIENT = 20
P99_TARGET_MS = 50.0
JETSTREAM_PUTS_TARGET = 500
JETSTREAM_DRAINS_TARGET = 5000
READY_TIMEOUT_S = 30.0
DIAL_TIMEOUT_S = 10.0
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def _start_relay(data: Path, mailbox_store: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start `python -m relay` on loopback (its mailbox on JetStream at `mailbox_store` if given) and return it with
    its address once it says it is ready."""
    store_args = ["--mailbox-store", mailbox_store] if mailbox_store else []
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "--listen", LOOPBACK, "--data", str(data), *store_args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT_S)
    line = process.stdout.readline() if ready else ""
    if not line:
        process.kill()
        raise RuntimeError(f"the relay did not report ready within {READY_TIMEOUT_S} s")
    return process, json.loads(line)["addresses"][0]


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def _p99_ms(latencies_s: list[float]) -> float:
    return statistics.quantiles(latencies_s, n=100)[98] * 1000


def _mailboxes(count: int) -> list[MailboxKeys]:
    secret = os.urandom(32)
    return [mailbox_keys(secret, 0, bucket) for bucket in range(count)]


async def _open_client(host: P2pHost, address: str) -> MailboxClient:
    """A mailbox session with the relay at `address`; the caller closes it."""
    _, stream = await dial_protocol(host, address, MAILBOX_PROTOCOL, timeout_s=DIAL_TIMEOUT_S)
    return await MailboxClient(stream).__aenter__()


async def _put_all(
    put: Callable[[int, MailboxKeys, bytes], Awaitable[object]], boxes: list[MailboxKeys], blobs: list[bytes]
) -> float:
    """Put `blobs` spread over `boxes`, one concurrent writer per box; return the seconds it took."""
    share = len(blobs) // len(boxes)

    async def write(index: int) -> None:
        for blob in blobs[index * share : (index + 1) * share]:
            await put(index, boxes[index], blob)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(len(boxes)):
            nursery.start_soon(write, index)
    return time.perf_counter() - started


async def _drain(
    fetch: Callable[[MailboxKeys, int], Awaitable[tuple[list[Any], bool]]], boxes: list[MailboxKeys]
) -> tuple[int, float]:
    """Fetch every blob of `boxes`; return how many and the seconds it took."""
    drained = 0
    started = time.perf_counter()
    for box in boxes:
        cursor, more = 0, True
        while more:
            items, more = await fetch(box, cursor)
            drained += len(items)
            cursor = items[-1].cursor if items else cursor
    return drained, time.perf_counter() - started


async def _baseline(store: MailboxStore, boxes: list[MailboxKeys], blobs: list[bytes]) -> tuple[float, float]:
    """Puts/s and drains/s straight into `store` (closed after) in this process: no protocol, no libp2p."""
    try:
        put_s = await _put_all(lambda _, box, blob: store.put(box.mailbox_id, blob), boxes, blobs)
        drained, drain_s = await _drain(
            lambda box, cursor: store.fetch(box.mailbox_id, cursor, FETCH_ITEMS_MAX, FETCH_REPLY_BYTES_MAX), boxes
        )
    finally:
        await store.close()
    return len(blobs) / put_s, drained / drain_s


async def _over_relay(address: str, boxes: list[MailboxKeys], blobs: list[bytes]) -> tuple[float, float]:
    async with p2p_host(DeviceIdentity(os.urandom(32)), [LOOPBACK]) as host:
        clients = [await _open_client(host, address) for _ in boxes]
        try:
            put_s = await _put_all(lambda index, box, blob: clients[index].put(box, blob), boxes, blobs)
            drained, drain_s = await _drain(lambda box, cursor: clients[0].fetch(box, cursor), boxes)
        finally:
            for client in clients:
                await client.aclose()
    if drained != len(blobs):
        raise RuntimeError(f"drained {drained} of {len(blobs)} batches")
    return len(blobs) / put_s, drained / drain_s


async def _put_latencies(address: str, clients_count: int, puts_each: int, interval_s: float = 0.0) -> list[float]:
    """Latencies of `puts_each` puts by each of `clients_count` sessions at once, one mailbox each: back to back when
    `interval_s` is 0 (saturation), else one put every `interval_s` per client from a random phase."""
    boxes = _mailboxes(clients_count)
    latencies: list[float] = []
    async with p2p_host(DeviceIdentity(os.urandom(32)), [LOOPBACK]) as host:
        clients: list[MailboxClient] = []
        try:
            for _ in boxes:
                clients.append(await _open_client(host, address))
            start = trio.Event()

            async def write(client: MailboxClient, box: MailboxKeys) -> None:
                await start.wait()
                due = trio.current_time() + random.uniform(0, interval_s)
                for _ in range(puts_each):
                    await trio.sleep_until(due)
                    # From when the put was due, not when it began: a relay that falls behind is charged for the wait.
                    scheduled = due if interval_s else trio.current_time()
                    await client.put(box, os.urandom(BATCH_BYTES))
                    latencies.append(trio.current_time() - scheduled)
                    due += interval_s

            async with trio.open_nursery() as nursery:
                for client, box in zip(clients, boxes):
                    nursery.start_soon(write, client, box)
                start.set()
        finally:
            for client in clients:
                await client.aclose()
    return latencies


async def _bench(root: Path) -> list[Metric]:
    boxes = _mailboxes(WRITERS)
    blobs = [os.urandom(BATCH_BYTES) for _ in range(BATCHES)]
    baseline_puts, baseline_drains = await _baseline(await SqliteMailboxStore.open(root / "baseline"), boxes, blobs)
    process, address = _start_relay(root / "relay")
    try:
        idle_rss = rss_mib(process.pid)
        puts, drains = await _over_relay(address, boxes, blobs)
        alone_p99 = _p99_ms(await _put_latencies(address, 1, CONCURRENT_CLIENTS))
        paced_p99 = _p99_ms(
            await _put_latencies(address, CONCURRENT_CLIENTS, PACED_PUTS_PER_CLIENT, PUT_INTERVAL_MS / 1000)
        )
        crowd_p99 = _p99_ms(await _put_latencies(address, CONCURRENT_CLIENTS, PUTS_PER_CONCURRENT_CLIENT))
        rss = rss_mib(process.pid)
    finally:
        _stop(process)
    label = f"mailbox_{BATCHES // 1000}k_x_{BATCH_BYTES // 1024}KiB"
    paced_rate = CONCURRENT_CLIENTS * 1000 // PUT_INTERVAL_MS
    jetstream = await _bench_jetstream(root, boxes, blobs, (baseline_puts, baseline_drains), (puts, drains), paced_p99)
    return [
        metric(f"{label}_puts_per_s", puts, "puts/s", baseline_puts, ">= 500 puts/s over libp2p", puts >= 500),
        metric(
            f"{label}_drains_per_s", drains, "items/s", baseline_drains, ">= 5000 items/s over libp2p", drains >= 5000
        ),
        metric(f"{label}_relay_rss", rss, "MiB", idle_rss, "<= 256 MiB", rss <= 256),
        metric(
            f"mailbox_{CONCURRENT_CLIENTS}_clients_{paced_rate}_puts_per_s_put_p99",
            paced_p99,
            "ms",
            alone_p99,
            f"< {P99_TARGET_MS:g} ms",
            paced_p99 < P99_TARGET_MS,
        ),
        metric(
            f"mailbox_{CONCURRENT_CLIENTS}_clients_saturated_put_p99",
            crowd_p99,
            "ms",
            alone_p99,
            f"< {P99_TARGET_MS:g} ms",
            crowd_p99 < P99_TARGET_MS,
        ),
        *jetstream,
    ]


async def _bench_jetstream(
    root: Path,
    boxes: list[MailboxKeys],
    blobs: list[bytes],
    sqlite_store: tuple[float, float],
    sqlite_relay: tuple[float, float],
    sqlite_paced_p99: float,
) -> list[Metric]:
    """The same puts and drains on a 3-server JetStream cluster (replicas 3), in process and through a relay
    process, and the paced put p99; each beside the SQLite figure of this run."""
    cluster = NatsCluster(root / "nats").start()
    try:
        urls = cluster.urls
        store_puts, store_drains = await _baseline(
            await JetStreamMailboxStore.open(urls, stream="AICO_BENCH_STORE"), boxes, blobs
        )
        process, address = _start_relay(root / "relay-jetstream", ",".join(urls))
        try:
            puts, drains = await _over_relay(address, boxes, blobs)
            paced_p99 = _p99_ms(
                await _put_latencies(address, CONCURRENT_CLIENTS, PACED_PUTS_PER_CLIENT, PUT_INTERVAL_MS / 1000)
            )
        finally:
            _stop(process)
    finally:
        cluster.stop()
    label = f"mailbox_jetstream_r3_{BATCHES // 1000}k_x_{BATCH_BYTES // 1024}KiB"
    paced_rate = CONCURRENT_CLIENTS * 1000 // PUT_INTERVAL_MS
    return [
        metric(f"{label}_store_puts_per_s", store_puts, "puts/s", sqlite_store[0], "reported, vs SQLite", True),
        metric(f"{label}_store_drains_per_s", store_drains, "items/s", sqlite_store[1], "reported, vs SQLite", True),
        metric(
            f"{label}_puts_per_s", puts, "puts/s", sqlite_relay[0], f">= {JETSTREAM_PUTS_TARGET} puts/s over libp2p",
            puts >= JETSTREAM_PUTS_TARGET,
        ),
        metric(
            f"{label}_drains_per_s", drains, "items/s", sqlite_relay[1],
            f">= {JETSTREAM_DRAINS_TARGET} items/s over libp2p", drains >= JETSTREAM_DRAINS_TARGET,
        ),
        metric(
            f"mailbox_jetstream_r3_{CONCURRENT_CLIENTS}_clients_{paced_rate}_puts_per_s_put_p99", paced_p99, "ms",
            sqlite_paced_p99, f"< {P99_TARGET_MS:g} ms", paced_p99 < P99_TARGET_MS,
        ),
    ]  # fmt: skip


def bench_mailbox() -> list[Metric]:
    """10k sealed batches put and drained through a relay process, and 100 clients putting at once: paced, and back to
    back."""
    # Earlier phases (a 100k-op catch-up) leave dirty pages the kernel writes back later; flushed now, that writeback
    # does not stall the relay's own commits, whose fsyncs every put waits for.
    os.sync()
    with tempfile.TemporaryDirectory(prefix="aico-bench-relay-") as root:
        return trio.run(_bench, Path(root))


def _expect_path(node: NodeProcess, path: str) -> None:
    """Fail unless the node's session with its peer runs on `path`: a figure measured on the wrong path is worthless."""
    with node.client() as client:
        peers = client.call("status")["peers"]
    if [peer["path"] for peer in peers] != [path]:
        raise RuntimeError(f"expected one session on the {path} path, {node.home.name} has {peers}")


def _sync_run(a_home: Path, b_home: Path, relay: str | None, path: str) -> tuple[_CatchUp, _LiveLatency]:
    """Catch-up of B from A then live latency from A to B, both checked to run on `path`."""
    run = _catch_up(a_home, b_home, relay)
    try:
        for node in (run.a, run.b):
            _expect_path(node, path)
        live = _live_latency(run.a, run.b)
        for node in (run.a, run.b):
            _expect_path(node, path)
    finally:
        run.a.stop()
        run.b.stop()
    return run, live


def _bench_paths(root: Path) -> list[Metric]:
    """The direct and the relayed run start from copies of the same two paired homes, A holding 100k imported ops."""
    a_home, b_home, _ = _paired_homes(root / "direct")
    relayed_a, relayed_b = root / "relayed" / "a", root / "relayed" / "b"
    shutil.copytree(a_home, relayed_a)
    shutil.copytree(b_home, relayed_b)
    direct, direct_live = _sync_run(a_home, b_home, None, "direct")
    process, relay = _start_relay(root / "relay")
    try:
        relayed, relayed_live = _sync_run(relayed_a, relayed_b, relay, "relayed")
    finally:
        _stop(process)
    rate, direct_rate = CATCH_UP_OPS / relayed.catch_up_s, CATCH_UP_OPS / direct.catch_up_s
    # Ops B drained from the relay's mailbox, which A fills at the same time, did not cross the session.
    session_bytes, direct_bytes = relayed.peer["bytes_in"] / CATCH_UP_OPS, direct.peer["bytes_in"] / CATCH_UP_OPS
    return [
        metric(
            "relayed_catch_up_100k_ops_per_s_from_ready", rate, "ops/s", direct_rate, ">= 0.5x direct",
            rate >= 0.5 * direct_rate,
        ),
        metric("relayed_catch_up_session_bytes_per_op", session_bytes, "bytes", direct_bytes, "reported", True),
        metric(
            "relayed_live_latency_p50_ms", relayed_live.p50_ms, "ms", direct_live.p50_ms, "<= 2x direct",
            relayed_live.p50_ms <= 2 * direct_live.p50_ms,
        ),
        metric("relayed_live_latency_p99_ms", relayed_live.p99_ms, "ms", direct_live.p99_ms, "reported", True),
    ]  # fmt: skip


def bench_relay() -> list[Metric]:
    """Catch-up and live latency through a relay against the direct path, and the mailbox."""
    # The mailbox first: after the paths phase (and the deletion of its stores) its fsync-bound put tail measured
    # 120-160 ms, against 8-10 ms run on its own.
    mailbox = bench_mailbox()
    with tempfile.TemporaryDirectory(prefix="aico-bench-relay-") as root:
        paths = _bench_paths(Path(root))
    return [*paths, *mailbox]
