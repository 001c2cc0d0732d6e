"""One role of the network-namespace circuit test, run as `python -m tests.relay.circuit_netns_peer ROLE ...`.

Roles: `capture FILE` (every frame on every link of this namespace, appended to FILE), `relay ADDR...` (a circuit
relay HOP), `listen ADDR RELAY_ADDR MARKER` (reserve on the relay, answer one marker with MARKER), `dial ADDR
DIRECT_ADDR CIRCUIT_ADDR MARKER` (check the direct address is unreachable, then trade markers through the relay).
Each prints one JSON line when ready or done.
"""

import contextlib
import json
import os
import signal
import socket
import sys

import trio
from libp2p.abc import INetStream

from node.net.circuit import accept_relayed_connections, reserve, stream_path
from node.net.dial import dial_protocol
from node.net.host import DialError, p2p_host
from node.trust.identity import DeviceIdentity
from p2p import READ_BYTES, read_chunk
from relay.circuit import relay_host

MARKER_PROTOCOL = "/aico/test-marker/1"
ETH_P_ALL = 0x0003
STEP_TIMEOUT_S = 10.0


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


class _Stop(Exception):
    """SIGTERM: stop capturing once the frames already received are written."""


def _stop(signum: int, frame: object) -> None:
    raise _Stop


def capture(path: str) -> None:
    """Append every frame seen on any link of this namespace to `path`; on SIGTERM write the frames the kernel has
    already queued, say so, and exit."""
    signal.signal(signal.SIGTERM, _stop)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as raw, open(path, "ab") as out:
        say(capturing=True)
        try:
            while True:
                out.write(raw.recv(65536 * 4))
        except _Stop:
            raw.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:  # bounded by the socket's receive queue
                    out.write(raw.recv(65536 * 4))
    say(stopped=True)


async def relay(listen_addrs: list[str]) -> None:
    async with relay_host(listen_addrs) as host:
        say(addresses=host.addresses)
        await trio.sleep_forever()


async def read_marker(stream: INetStream, length: int) -> bytes:
    received = b""
    while len(received) < length and (chunk := await stream.read(READ_BYTES)):
        received += chunk
    return received


async def listen(listen_addr: str, relay_addr: str, marker: str) -> None:
    async with p2p_host(DeviceIdentity(os.urandom(32)), [listen_addr]) as host:
        accept_relayed_connections(host)
        heard = trio.Event()

        async def answer(stream: INetStream) -> None:
            # The dialler's marker is as long as ours.
            with trio.fail_after(STEP_TIMEOUT_S):
                say(heard=(await read_marker(stream, len(marker))).decode(), from_peer=str(stream.muxed_conn.peer_id))
                await stream.write(marker.encode())
                await stream.close()
                # The dialler closes its side once it has read our answer: until then the host must stay up.
                while await read_chunk(stream):
                    pass
            heard.set()

        host.libp2p_host.set_stream_handler(MARKER_PROTOCOL, answer)
        reservation = await reserve(host, relay_addr, timeout_s=STEP_TIMEOUT_S)
        say(peer_id=host.peer_id, addresses=host.addresses, circuit_address=reservation.circuit_address)
        await heard.wait()


async def dial(listen_addr: str, direct_addr: str, circuit_address: str, marker: str) -> None:
    async with p2p_host(DeviceIdentity(os.urandom(32)), [listen_addr]) as host:
        try:
            await dial_protocol(host, direct_addr, MARKER_PROTOCOL, timeout_s=3)
            direct_error = None
        except DialError as error:
            direct_error = str(error)
        peer_id, stream = await dial_protocol(host, circuit_address, MARKER_PROTOCOL, timeout_s=STEP_TIMEOUT_S)
        with trio.fail_after(STEP_TIMEOUT_S):
            await stream.write(marker.encode())
            answer = await read_marker(stream, len(marker))
            await stream.close()
        say(peer_id=host.peer_id, direct_error=direct_error, path=stream_path(stream), answer=answer.decode())


def main(role: str, *args: str) -> None:
    if role == "capture":
        capture(args[0])
    elif role == "relay":
        trio.run(relay, list(args))
    elif role == "listen":
        trio.run(listen, *args)
    elif role == "dial":
        trio.run(dial, *args)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
