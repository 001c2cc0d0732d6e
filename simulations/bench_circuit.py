"""Benchmark: a circuit through a relay against a direct connection, both on loopback in the same run."""

import json
import os
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from node.net.circuit import accept_relayed_connections, circuit_addr, reserve
from node.net.dial import dial_protocol
from node.net.host import P2pHost, p2p_host
from node.trust.identity import DeviceIdentity
from p2p import READ_BYTES
from simulations.metrics import Metric, metric

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
ECHO = TProtocol("/aico/bench-echo/1")
SINK = TProtocol("/aico/bench-sink/1")
SINK_ACK = b"k"
STEP_TIMEOUT_S = 60.0
# The relay runs in a process of its own, as on a real relay machine: in this process its forwarding would take turns
# with both devices' work on one thread.
RELAY_SCRIPT = """
import json, trio
from relay.circuit import relay_host
async def main():
    async with relay_host(["/ip4/127.0.0.1/tcp/0"]) as relay:
        print(json.dumps(relay.addresses), flush=True)
        await trio.sleep_forever()
trio.run(main)
"""


@asynccontextmanager
async def _relay_process() -> AsyncIterator[str]:
    """Run a relay in a child process on loopback and yield its multiaddr; stop it on exit."""
    process = subprocess.Popen([sys.executable, "-c", RELAY_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        with trio.fail_after(STEP_TIMEOUT_S):
            assert process.stdout is not None
            line = await trio.to_thread.run_sync(process.stdout.readline)
        yield json.loads(line)[0]
    finally:
        process.kill()
        process.wait(timeout=STEP_TIMEOUT_S)


async def _echo(stream: INetStream) -> None:
    """Send back every byte until the stream ends."""
    try:
        while data := await stream.read(READ_BYTES):
            await stream.write(data)
    except Exception:  # the bench's peer resets streams it is done with; this handler must not stop the swarm
        return


def _sink(total_bytes: int) -> Callable[[INetStream], Awaitable[None]]:
    async def sink(stream: INetStream) -> None:
        """Read `total_bytes`, then acknowledge with one byte."""
        try:
            received = 0
            while received < total_bytes and (data := await stream.read(READ_BYTES)):
                received += len(data)
            await stream.write(SINK_ACK)
        except Exception:  # as in _echo
            return

    return sink


async def _connect_ms(dialler: P2pHost, addr: str, peer_id: str, rounds: int) -> float:
    """Median time (ms) to connect afresh and open a stream."""
    times = []
    for _ in range(rounds):
        started = trio.current_time()
        _, stream = await dial_protocol(dialler, addr, ECHO, timeout_s=STEP_TIMEOUT_S)
        times.append((trio.current_time() - started) * 1000)
        await stream.reset()
        await dialler.libp2p_host.disconnect(ID.from_base58(peer_id))
    return statistics.median(times)


async def _round_trip_ms(stream: INetStream, rounds: int, payload_bytes: int = 64) -> float:
    """Median round trip (ms) of a small payload."""
    payload, times = os.urandom(payload_bytes), []
    for _ in range(rounds):
        started = trio.current_time()
        await stream.write(payload)
        received = 0
        while received < payload_bytes:
            received += len(await stream.read(READ_BYTES))
        times.append((trio.current_time() - started) * 1000)
    return statistics.median(times)


async def _throughput_mb_per_s(dialler: P2pHost, addr: str, total_bytes: int) -> float:
    """MB/s of `total_bytes` sent one way, until the receiver acknowledges the last byte."""
    _, stream = await dial_protocol(dialler, addr, SINK, timeout_s=STEP_TIMEOUT_S)
    chunk = os.urandom(READ_BYTES)
    started = trio.current_time()
    sent = 0
    while sent < total_bytes:
        await stream.write(chunk[: total_bytes - sent])
        sent += min(len(chunk), total_bytes - sent)
    assert await stream.read(1) == SINK_ACK
    elapsed_s = trio.current_time() - started
    await stream.reset()
    return total_bytes / elapsed_s / 1e6


async def _measure(connect_rounds: int, rtt_rounds: int, bulk_bytes: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    async with (
        _relay_process() as relay_addr,
        p2p_host(DeviceIdentity(os.urandom(32))) as a,
        p2p_host(DeviceIdentity(os.urandom(32))) as b,
    ):
        accept_relayed_connections(b)
        b.libp2p_host.set_stream_handler(ECHO, _echo)
        b.libp2p_host.set_stream_handler(SINK, _sink(bulk_bytes))
        await reserve(b, relay_addr, timeout_s=STEP_TIMEOUT_S)
        paths = {"direct": b.addresses[0], "relayed": circuit_addr(relay_addr, b.peer_id)}
        for path, addr in paths.items():
            with trio.fail_after(STEP_TIMEOUT_S * 3):
                connect_ms = await _connect_ms(a, addr, b.peer_id, connect_rounds)
                _, stream = await dial_protocol(a, addr, ECHO, timeout_s=STEP_TIMEOUT_S)
                rtt_ms = await _round_trip_ms(stream, rtt_rounds)
                await stream.reset()
                mb_per_s = await _throughput_mb_per_s(a, addr, bulk_bytes)
                await a.libp2p_host.disconnect(ID.from_base58(b.peer_id))
            results[path] = {"connect_ms": connect_ms, "rtt_ms": rtt_ms, "mb_per_s": mb_per_s}
    return results


def bench_circuit(connect_rounds: int = 20, rtt_rounds: int = 500, bulk_bytes: int = 10_000_000) -> list[Metric]:
    """Connect time, small round trip (p50) and one-way bulk throughput through a relay process, against direct."""
    results = trio.run(_measure, connect_rounds, rtt_rounds, bulk_bytes)
    direct, relayed = results["direct"], results["relayed"]
    return [
        metric(
            "circuit_connect_ms_p50", relayed["connect_ms"], "ms", direct["connect_ms"], "<= 3x direct",
            relayed["connect_ms"] <= 3 * direct["connect_ms"],
        ),
        metric(
            "circuit_round_trip_ms_p50", relayed["rtt_ms"], "ms", direct["rtt_ms"], "<= 3x direct",
            relayed["rtt_ms"] <= 3 * direct["rtt_ms"],
        ),
        metric(
            "circuit_bulk_mb_per_s", relayed["mb_per_s"], "MB/s", direct["mb_per_s"], ">= 0.3x direct",
            relayed["mb_per_s"] >= 0.3 * direct["mb_per_s"],
        ),
    ]  # fmt: skip
