"""The node's RPC socket over real Unix sockets: framing, errors, limits, socket file handling and streaming."""

import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from node.api.rpc import (
    NodeNotRunning,
    RpcClient,
    RpcError,
    RpcRemoteError,
    RpcTimeoutError,
    RpcUserError,
    StreamedReply,
    serve_rpc,
)
from node.bus import MEMORY_STORE_REQUEST, Bus
from node.errors import NodeError

TIMEOUT_S = 5


class NotFound(RpcUserError):
    rpc_error_type = "not_found"


class Conflict(Exception):
    """Not an RpcUserError: only its `rpc_error_type` marks it as the caller's fault."""

    rpc_error_type = "conflict"


async def add(params: dict[str, Any]) -> int:
    return params["a"] + params["b"]


async def find(params: dict[str, Any]) -> None:
    raise NotFound(f"no preference {params['key']!r}")


async def conflict(params: dict[str, Any]) -> None:
    raise Conflict("edited concurrently")


async def crash(params: dict[str, Any]) -> None:
    raise ZeroDivisionError("division by zero")


async def hang(params: dict[str, Any]) -> None:
    await trio.sleep_forever()


async def count(params: dict[str, Any]) -> StreamedReply:
    async def items() -> AsyncIterator[int]:
        for n in range(params["n"]):
            yield n

    return StreamedReply(items())


HANDLERS: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
    "add": add,
    "find": find,
    "conflict": conflict,
    "crash": crash,
    "hang": hang,
    "count": count,
}


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chmod(home, 0o700)
    return home / "node.sock"


async def start_server(nursery: trio.Nursery, path: Path, handlers: Any = HANDLERS, **limits: Any) -> None:
    await nursery.start(partial(serve_rpc, path, handlers, **limits))


async def in_thread(function: Callable[[], Any]) -> Any:
    """Run blocking client code off the trio thread (the client's own timeouts bound it)."""
    return await trio.to_thread.run_sync(function)


def call(path: Path, method: str, timeout_s: float = TIMEOUT_S, **params: Any) -> Any:
    with RpcClient.connect(path, timeout_s=timeout_s) as client:
        return client.call(method, **params)


def remote_error(path: Path, method: str, **params: Any) -> RpcRemoteError:
    with pytest.raises(RpcRemoteError) as raised:
        call(path, method, **params)
    return raised.value


async def read_frame(stream: trio.SocketStream) -> dict[str, Any] | None:
    """Read one response frame, or None at end of stream."""
    data = b""
    with trio.fail_after(TIMEOUT_S):
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                assert data == b"", "connection closed mid-frame"
                return None
            data += chunk
    return msgpack.unpackb(data[4:])


async def assert_closed(stream: trio.SocketStream) -> None:
    with trio.fail_after(TIMEOUT_S):
        assert await stream.receive_some(65536) == b""


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@pytest.mark.trio
async def test_calls_round_trip_on_one_connection(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path)

        def two_calls() -> list[int]:
            with RpcClient.connect(socket_path, timeout_s=TIMEOUT_S) as client:
                return [client.call("add", a=1, b=2), client.call("add", a=40, b=2)]

        assert await in_thread(two_calls) == [3, 42]
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_error_responses_carry_their_type(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path)

        def errors_then_a_call() -> tuple[list[tuple[str, str]], int]:
            errors = []
            with RpcClient.connect(socket_path, timeout_s=TIMEOUT_S) as client:
                for method, params in [("nope", {}), ("find", {"key": "theme"}), ("conflict", {}), ("crash", {})]:
                    with pytest.raises(RpcRemoteError) as raised:
                        client.call(method, **params)
                    errors.append((raised.value.type, raised.value.message))
                return errors, client.call("add", a=1, b=1)  # the connection survives handler errors

        errors, result = await in_thread(errors_then_a_call)
        assert errors[0][0] == "unknown_method" and "nope" in errors[0][1]
        assert errors[1] == ("not_found", "no preference 'theme'")
        assert errors[2] == ("conflict", "edited concurrently")
        assert errors[3][0] == "internal" and "ZeroDivisionError" in errors[3][1]
        assert result == 2
        nursery.cancel_scope.cancel()


@pytest.mark.trio
@pytest.mark.parametrize(
    ("body", "answer_id"),
    [
        (b"\xc1", None),  # never valid msgpack
        (msgpack.packb([1, "add", {}]), None),
        (msgpack.packb({"id": "1", "method": "add", "params": {}}), None),
        (msgpack.packb({"id": 7, "method": "add"}), 7),
        (msgpack.packb({"id": 8, "method": 3, "params": {}}), 8),
    ],
)
async def test_malformed_requests_are_answered_and_closed_while_others_are_served(
    socket_path: Path, body: bytes, answer_id: int | None
) -> None:
    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path)
        good = await in_thread(partial(RpcClient.connect, socket_path, TIMEOUT_S))
        async with await trio.open_unix_socket(os.fspath(socket_path)) as bad:
            await bad.send_all(frame(body))
            response = await read_frame(bad)
            assert response is not None
            assert response["id"] == answer_id and response["ok"] is False
            assert response["error"]["type"] == "malformed_request"
            await assert_closed(bad)
        assert await in_thread(partial(good.call, "add", a=2, b=3)) == 5
        good.close()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_an_oversized_request_is_refused_from_its_prefix(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path, request_bytes_max=1024)
        async with await trio.open_unix_socket(os.fspath(socket_path)) as raw:
            await raw.send_all((1 << 31).to_bytes(4, "big") + b"\x80")
            response = await read_frame(raw)
            assert response is not None and response["error"]["type"] == "request_too_large"
            await assert_closed(raw)
        # A client sending a body far over the limit gets the answer even though the node stops reading.
        error = await in_thread(partial(remote_error, socket_path, "add", a="x" * (4 << 20), b=""))
        assert error.type == "request_too_large"
        assert await in_thread(partial(call, socket_path, "add", a=1, b=2)) == 3
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_the_socket_is_owner_only_and_removed_on_exit(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path)
        status = os.lstat(socket_path)
        assert stat.S_ISSOCK(status.st_mode) and stat.S_IMODE(status.st_mode) == 0o600
        nursery.cancel_scope.cancel()
    assert not socket_path.exists()
    with pytest.raises(NodeNotRunning, match="aico-node run"):
        RpcClient.connect(socket_path)


@pytest.mark.trio
async def test_a_stale_socket_file_is_replaced(socket_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(socket_path))
    dead.close()  # a node that died leaves its socket file behind
    with pytest.raises(NodeNotRunning):
        RpcClient.connect(socket_path)
    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path)
        assert await in_thread(partial(call, socket_path, "add", a=1, b=2)) == 3
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_second_server_is_refused_while_the_first_runs(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path)
        with pytest.raises(RpcError, match="already running"):
            await serve_rpc(socket_path, HANDLERS)
        assert await in_thread(partial(call, socket_path, "add", a=1, b=2)) == 3
        nursery.cancel_scope.cancel()
    assert not socket_path.exists()


@pytest.mark.trio
async def test_a_directory_open_to_others_or_a_non_socket_file_is_refused(socket_path: Path) -> None:
    socket_path.write_bytes(b"precious")
    with pytest.raises(RpcError, match="not a socket"):
        await serve_rpc(socket_path, HANDLERS)
    assert socket_path.read_bytes() == b"precious"
    os.chmod(socket_path.parent, 0o750)
    with pytest.raises(RpcError, match="0700"):
        await serve_rpc(socket_path.parent / "other.sock", HANDLERS)


@pytest.mark.trio
async def test_a_stream_yields_its_items_then_the_connection_carries_on(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path)

        def stream_then_call() -> tuple[list[int], list[int], int]:
            with RpcClient.connect(socket_path, timeout_s=TIMEOUT_S) as client:
                four, none = list(client.stream("count", n=4)), list(client.stream("count", n=0))
                return four, none, client.call("add", a=1, b=1)

        assert await in_thread(stream_then_call) == ([0, 1, 2, 3], [], 2)
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_bus_subscription_streams_until_the_client_leaves(socket_path: Path) -> None:
    bus = Bus()
    subscribed, unsubscribed = trio.Event(), trio.Event()

    async def subscribe(params: dict[str, Any]) -> StreamedReply:
        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                async with bus.subscribe(params["pattern"]) as subscription:
                    subscribed.set()
                    async for event in subscription:
                        yield {"topic": event.topic, "payload": event.payload}
            finally:
                unsubscribed.set()

        return StreamedReply(events())

    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path, {"bus.subscribe": subscribe})

        def take_two() -> list[dict[str, Any]]:
            client = RpcClient.connect(socket_path, timeout_s=TIMEOUT_S)
            events = []
            for event in client.stream("bus.subscribe", pattern="memory.*"):
                events.append(event)
                if len(events) == 2:
                    break  # leaving the stream closes the connection, which ends the subscription
            return events

        async with trio.open_nursery() as clients:
            events: list[Any] = []
            clients.start_soon(lambda: _collect(events, take_two))
            with trio.fail_after(TIMEOUT_S):
                await subscribed.wait()
            bus.publish("user.preferences.changed", {"ignored": True})
            bus.publish(MEMORY_STORE_REQUEST, {"n": 1})
            bus.publish(MEMORY_STORE_REQUEST, {"n": 2})
        assert events == [{"topic": MEMORY_STORE_REQUEST, "payload": {"n": n}} for n in (1, 2)]
        with trio.fail_after(TIMEOUT_S):
            await unsubscribed.wait()  # the server noticed the client leave, with no event to send
        assert bus.publish(MEMORY_STORE_REQUEST, {}) == 0
        nursery.cancel_scope.cancel()


async def _collect(into: list[Any], function: Callable[[], list[Any]]) -> None:
    into.extend(await in_thread(function))


@pytest.mark.trio
async def test_a_silent_client_is_dropped_after_the_idle_timeout(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path, idle_timeout_s=0.2)
        started = time.monotonic()
        async with await trio.open_unix_socket(os.fspath(socket_path)) as silent:
            await assert_closed(silent)
        assert 0.15 < time.monotonic() - started < 2
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_slow_handler_times_out(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path, request_timeout_s=0.2)
        assert (await in_thread(partial(remote_error, socket_path, "hang"))).type == "timeout"
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_the_client_gives_up_after_its_timeout(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path)

        def impatient() -> None:
            client = RpcClient.connect(socket_path, timeout_s=0.2)
            with pytest.raises(RpcTimeoutError):
                client.call("hang")
            with pytest.raises(RpcError, match="closed"):  # a late answer must not be taken for the next one
                client.call("add", a=1, b=1)

        await in_thread(impatient)
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_connections_beyond_the_bound_are_refused_as_busy(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path, connections_max=1)
        async with await trio.open_unix_socket(os.fspath(socket_path)) as holder:
            # An answered request proves the server accepted the holder before the next client comes.
            await holder.send_all(frame(msgpack.packb({"id": 1, "method": "add", "params": {"a": 1, "b": 1}})))
            assert await read_frame(holder) == {"id": 1, "ok": True, "result": 2}
            assert (await in_thread(partial(remote_error, socket_path, "add", a=1, b=1))).type == "busy"
        with trio.fail_after(TIMEOUT_S):
            while True:  # the slot frees once the server sees the holder leave
                try:
                    assert await in_thread(partial(call, socket_path, "add", a=1, b=1)) == 2
                    break
                except RpcRemoteError as error:
                    assert error.type == "busy"
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


def test_errors_derive_from_node_error() -> None:
    assert issubclass(RpcError, NodeError) and issubclass(RpcUserError, NodeError)
    assert issubclass(NodeNotRunning, RpcError) and issubclass(RpcRemoteError, RpcError)


@pytest.mark.trio
async def test_a_result_that_cannot_be_encoded_is_an_internal_error(socket_path: Path) -> None:
    async def unencodable(params: dict[str, Any]) -> object:
        return object()

    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path, {"unencodable": unencodable})
        error = await in_thread(partial(remote_error, socket_path, "unencodable"))
        assert error.type == "internal" and "cannot be encoded" in error.message
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_request_retried_with_its_key_runs_once_and_gets_the_first_answer(socket_path: Path) -> None:
    runs: list[int] = []
    release = trio.Event()

    async def write(params: dict[str, Any]) -> int:
        runs.append(params["value"])
        await release.wait()  # slow enough that the first caller gives up before it is done
        return len(runs)

    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path, {**HANDLERS, "write": write})

        def impatient() -> None:
            with pytest.raises(RpcTimeoutError), RpcClient.connect(socket_path, timeout_s=0.5) as client:
                client.call_keyed("write", {"value": 1}, "k-1")

        await in_thread(impatient)

        def retry() -> Any:
            with RpcClient.connect(socket_path, timeout_s=TIMEOUT_S) as client:
                return client.call_keyed("write", {"value": 1}, "k-1")

        answers: list[Any] = []
        answered = trio.Event()

        async def retry_while_it_runs() -> None:
            answers.append(await in_thread(retry))
            answered.set()

        nursery.start_soon(retry_while_it_runs)
        release.set()  # the retry arrives while the first run is still going, or just after: one answer either way
        with trio.fail_after(TIMEOUT_S):
            await answered.wait()
        assert answers == [1]
        assert await in_thread(retry) == 1  # answered again from memory, on another connection
        with RpcClient.connect(socket_path, timeout_s=TIMEOUT_S) as client:
            assert await in_thread(lambda: client.call_keyed("write", {"value": 2}, "k-2")) == 2
        assert runs == [1, 2]
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_method_may_run_past_the_default_request_timeout_when_allowed(socket_path: Path) -> None:
    async def slow(params: dict[str, Any]) -> str:
        await trio.sleep(0.3)
        return "done"

    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path, {"slow": slow}, request_timeout_s=0.1, timeouts_s={"slow": 5.0})
        assert await in_thread(lambda: call(socket_path, "slow")) == "done"
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_the_command_line_sends_a_timed_out_call_again_on_a_new_connection_and_it_runs_once(
    socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cli.common

    runs: list[int] = []

    async def write(params: dict[str, Any]) -> int:
        runs.append(params["value"])
        if len(runs) == 1:
            await trio.sleep(0.7)  # the first attempt gives up after 0.5 s; its retry gets this run's answer at 0.7 s
        return len(runs)

    monkeypatch.setattr(cli.common, "_call_timeout_s", lambda method: 0.5)
    async with trio.open_nursery() as nursery:
        await start_server(nursery, socket_path, {**HANDLERS, "write": write})
        answered, result = await in_thread(partial(cli.common.call_node, socket_path.parent, "write", {"value": 7}))
        assert (answered, result) == (True, 1)
        assert runs == [7]
        nursery.cancel_scope.cancel()
