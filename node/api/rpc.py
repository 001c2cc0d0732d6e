"""The node's local RPC socket: length-prefixed msgpack requests over an owner-only Unix socket, server and client.

A frame is a 4-byte big-endian length and a msgpack body. A request is `{"id", "method", "params"}`; the answer is
`{"id", "ok": true, "result"}`, or `{"id", "ok": false, "error": {"type", "message"}}`, or for a streaming method
one `{"id", "ok": true, "stream": item}` per item and a final `{"id", "ok": true, "end": true}`.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import attrs
import msgpack
import trio

from framing import FrameBuffer, RemoteProtocolError, length_prefixed
from node.errors import NodeError

REQUEST_BYTES_MAX = 4 * 1024 * 1024
RESPONSE_BYTES_MAX = 64 * 1024 * 1024
REQUEST_TIMEOUT_S = 30.0
REQUEST_KEY_CHARS_MAX = 64
RECENT_ANSWERS_MAX = 1024  # keyed answers kept for retries; a retry comes within seconds
IDLE_TIMEOUT_S = 300.0
CONNECTIONS_MAX = 64
CONNECT_TIMEOUT_S = 5.0

# Error types the server itself answers with; handlers add their own through `rpc_error_type`.
UNKNOWN_METHOD = "unknown_method"
INTERNAL = "internal"
MALFORMED_REQUEST = "malformed_request"
REQUEST_TOO_LARGE = "request_too_large"
TIMEOUT = "timeout"
BUSY = "busy"

_RECEIVE_CHUNK_BYTES = 64 * 1024
_LISTEN_BACKLOG = 64
_PROBE_TIMEOUT_S = 1.0
_REFUSAL_SEND_TIMEOUT_S = 0.5
_STREAM_CLOSE_TIMEOUT_S = 1.0
_ACCEPT_RETRY_S = 0.1
# sun_path holds 108 bytes including the terminating NUL.
_SOCKET_PATH_BYTES_MAX = 107
# Running out of descriptors or memory is transient: wait and accept again rather than stop serving.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class RpcError(NodeError):
    """The RPC socket cannot be served or used, or a peer broke the framing."""


class NodeNotRunning(RpcError):
    """No node is listening on the RPC socket."""


class RpcTimeoutError(RpcError):
    """The node did not answer within the client's timeout."""


class RpcRemoteError(RpcError):
    """The node answered a request with an error."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


class RpcUserError(NodeError):
    """A handler error caused by the caller's request; its type and message are sent back as they are."""

    rpc_error_type = "user_error"


@attrs.frozen
class StreamedReply:
    """A handler result whose items are sent one frame each, followed by an end marker."""

    items: AsyncGenerator[Any, None]


class _MalformedRequest(Exception):
    """A request frame that is not a well-formed request; carries its id when one could be read."""

    def __init__(self, request_id: int | None, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


def _frame(message: dict[str, Any]) -> bytes:
    return length_prefixed(msgpack.packb(message, use_bin_type=True))


def _error_response(request_id: int | None, error_type: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"type": error_type, "message": message}}


def _parse_request(body: bytes) -> tuple[int, str, dict[str, Any], str | None]:
    try:
        request = msgpack.unpackb(body, raw=False)
    except Exception:  # msgpack raises many exception types for bad input
        raise _MalformedRequest(None, "the request is not valid msgpack") from None
    if type(request) is not dict:
        raise _MalformedRequest(None, "the request is not a map")
    request_id, method, params = request.get("id"), request.get("method"), request.get("params")
    if type(request_id) is not int:
        raise _MalformedRequest(None, "the request has no integer 'id'")
    if type(method) is not str or type(params) is not dict:
        raise _MalformedRequest(request_id, "the request needs a string 'method' and a map 'params'")
    key = request.get("key")
    if key is not None and (type(key) is not str or not 0 < len(key) <= REQUEST_KEY_CHARS_MAX):
        raise _MalformedRequest(request_id, f"a request 'key' is a string of 1 to {REQUEST_KEY_CHARS_MAX} characters")
    return request_id, method, params, key


class _Oversized(StrEnum):
    """A frame too large for the RPC socket, by direction."""

    REQUEST = REQUEST_TOO_LARGE
    RESPONSE = "response_too_large"


@attrs.frozen
class _Limits:
    """How long and how much one server accepts."""

    request_timeout_s: float
    idle_timeout_s: float
    connections_max: int
    request_bytes_max: int


class _Answer:
    """The answer to a keyed request, once it is known."""

    def __init__(self) -> None:
        self.settled = trio.Event()
        self.outcome: dict[str, Any] | None = None

    def settle(self, outcome: dict[str, Any]) -> None:
        self.outcome = outcome
        self.settled.set()


class _Server:
    """Answers requests on accepted connections with the registered handlers."""

    def __init__(self, handlers: Mapping[str, Handler], limits: _Limits, timeouts_s: Mapping[str, float]) -> None:
        self._handlers = handlers
        self._limits = limits
        self._timeouts_s = timeouts_s
        self._connections_open = 0
        # Answers to requests that carried a key, so a client retrying after a timeout never runs a write twice.
        self._recent: collections.OrderedDict[tuple[str, str], _Answer] = collections.OrderedDict()

    async def accept_forever(self, listener: trio.SocketListener, nursery: trio.Nursery) -> NoReturn:
        """Accept connections and serve each in its own task, refusing those beyond the connection bound."""
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                logger.error("rpc accept failed (%s); retrying in %s s", os.strerror(error.errno), _ACCEPT_RETRY_S)
                await trio.sleep(_ACCEPT_RETRY_S)
                continue
            if self._connections_open >= self._limits.connections_max:
                await self._refuse(stream)
                continue
            self._connections_open += 1
            nursery.start_soon(self._serve_connection, stream)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        message = f"the node serves at most {self._limits.connections_max} connections; try again later"
        with trio.move_on_after(_REFUSAL_SEND_TIMEOUT_S):
            try:
                await stream.send_all(_frame(_error_response(None, BUSY, message)))
            except trio.BrokenResourceError:
                pass  # the client already left; nothing to tell it
        await stream.aclose()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        buffer = FrameBuffer(self._limits.request_bytes_max, _Oversized.REQUEST)
        try:
            async with stream:
                while await self._serve_request(stream, buffer):
                    pass
        except trio.BrokenResourceError:
            pass  # the client reset the connection; nothing is owed to it
        finally:
            self._connections_open -= 1

    async def _serve_request(self, stream: trio.SocketStream, buffer: FrameBuffer) -> bool:
        """Read, answer and send one request; whether the connection stays open."""
        try:
            body = await self._next_body(stream, buffer)
        except RemoteProtocolError as error:
            await self._send(stream, _error_response(None, REQUEST_TOO_LARGE, f"a request: {error.detail}"))
            return False
        if body is None:
            return False
        try:
            request_id, method, params, key = _parse_request(body)
        except _MalformedRequest as error:
            await self._send(stream, _error_response(error.request_id, MALFORMED_REQUEST, str(error)))
            return False
        outcome = await self._call_once(request_id, method, params, key)
        if isinstance(outcome, StreamedReply):
            return await self._send_stream(stream, request_id, method, outcome)
        return await self._send(stream, outcome)

    async def _next_body(self, stream: trio.SocketStream, buffer: FrameBuffer) -> bytes | None:
        """The next request's body; None when the client closes, stays idle past the idle timeout before a request,
        or takes longer than the request timeout to send one (a client dripping bytes cannot hold a connection)."""
        limits = self._limits
        deadline = trio.current_time() + limits.idle_timeout_s
        started = False
        while (body := buffer.next_body()) is None:
            if buffer.buffered_bytes and not started:
                started, deadline = True, trio.current_time() + limits.request_timeout_s
            chunk = b""
            with trio.move_on_at(deadline):
                chunk = await stream.receive_some(_RECEIVE_CHUNK_BYTES)
            if not chunk:
                return None
            buffer.feed(chunk)
        return body

    async def _call_once(
        self, request_id: int, method: str, params: dict[str, Any], key: str | None
    ) -> dict[str, Any] | StreamedReply:
        """Answer a request; one that repeats an earlier one's key gets the earlier answer (the call ran once)."""
        if key is None:
            return await self._call(request_id, method, params)
        earlier = self._recent.get((method, key))
        if earlier is None:
            earlier = self._recent[(method, key)] = _Answer()
            while len(self._recent) > RECENT_ANSWERS_MAX:
                self._recent.popitem(last=False)
            outcome = await self._call(request_id, method, params)
            if isinstance(outcome, StreamedReply):  # a stream is answered once, to its own connection
                self._recent.pop((method, key), None)
                return outcome
            earlier.settle(outcome)
        with trio.move_on_after(self._timeouts_s.get(method, self._limits.request_timeout_s)):
            await earlier.settled.wait()
        answer = earlier.outcome
        if answer is None:
            return _error_response(request_id, TIMEOUT, f"{method} with this request key is still running")
        return {**answer, "id": request_id}

    async def _call(self, request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any] | StreamedReply:
        handler = self._handlers.get(method)
        if handler is None:
            return _error_response(request_id, UNKNOWN_METHOD, f"the node has no method {method!r}")
        timeout_s = self._timeouts_s.get(method, self._limits.request_timeout_s)
        with trio.move_on_after(timeout_s) as scope:
            try:
                result = await handler(params)
            except Exception as error:
                return _handler_error_response(request_id, method, error)
        if scope.cancelled_caught:
            return _error_response(request_id, TIMEOUT, f"{method} did not finish within {timeout_s} s")
        if isinstance(result, StreamedReply):
            return result
        return {"id": request_id, "ok": True, "result": result}

    async def _send(self, stream: trio.SocketStream, response: dict[str, Any]) -> bool:
        """Send one response within the request timeout; whether the connection can carry another request."""
        encodable = True
        try:
            frame = _frame(response)
        except (TypeError, ValueError, OverflowError) as error:
            # A handler bug: tell the client, then end the connection as for any failed response.
            logger.error("rpc response to request %s cannot be encoded: %s", response.get("id"), error)
            frame = _frame(_error_response(response.get("id"), INTERNAL, f"the result cannot be encoded: {error}"))
            encodable = False
        with trio.move_on_after(self._limits.request_timeout_s) as scope:
            try:
                await stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
        return encodable and not scope.cancelled_caught

    async def _send_stream(self, stream: trio.SocketStream, request_id: int, method: str, items: StreamedReply) -> bool:
        """Send each item then the end marker; whether the connection can carry another request.

        Waiting for the next item is unbounded (a subscription may be quiet for hours), so the stream stops as soon
        as the client closes the connection or sends anything, which is how a client unsubscribes.
        """
        finished = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_readable, stream, nursery.cancel_scope)
                try:
                    async for item in items.items:
                        if not await self._send(stream, {"id": request_id, "ok": True, "stream": item}):
                            break
                    else:
                        finished = await self._send(stream, {"id": request_id, "ok": True, "end": True})
                except Exception as error:
                    await self._send(stream, _handler_error_response(request_id, method, error))
                nursery.cancel_scope.cancel()
        finally:
            aclose = getattr(items.items, "aclose", None)
            if aclose is not None:
                # The generator's cleanup (e.g. leaving a bus subscription) must run even while shutting down.
                with trio.move_on_after(_STREAM_CLOSE_TIMEOUT_S) as cleanup:
                    cleanup.shield = True
                    await aclose()
        return finished


async def _cancel_when_readable(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    await trio.lowlevel.wait_readable(stream.socket)
    scope.cancel()


def _handler_error_response(request_id: int, method: str, error: Exception) -> dict[str, Any]:
    error_type = getattr(type(error), "rpc_error_type", None)
    if isinstance(error_type, str):
        return _error_response(request_id, error_type, str(error))
    logger.error("rpc method %s failed", method, exc_info=error)
    return _error_response(request_id, INTERNAL, f"{method} failed: {type(error).__name__}: {error}")


def _check_private_dir(directory: Path) -> None:
    try:
        status = os.stat(directory)
    except FileNotFoundError:
        raise RpcError(f"the socket's directory {directory} does not exist") from None
    mode = stat.S_IMODE(status.st_mode)
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or mode & 0o077:
        raise RpcError(
            f"the socket's directory {directory} must be a directory owned by this user and closed to others "
            f"(mode 0700), but it has mode {mode:04o}; run `chmod 700 {directory}`"
        )


async def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a node that died; refuse if a node still answers on it."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(status.st_mode):
        raise RpcError(f"{path} exists and is not a socket; refusing to replace it")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            with trio.fail_after(_PROBE_TIMEOUT_S):
                await probe.connect(os.fspath(path))
        except ConnectionRefusedError:
            path.unlink(missing_ok=True)
            return
        except trio.TooSlowError:
            pass  # a listener exists but its queue is full: a node is running, just busy
        except OSError as error:
            raise RpcError(f"cannot probe {path}: {error}") from error
    raise RpcError(f"a node is already running at {path}; stop it before starting another")


async def _bind(path: Path) -> trio.socket.SocketType:
    """Listen on a new Unix socket at `path`, readable and writable by its owner only."""
    _check_private_dir(path.parent)
    if len(os.fsencode(path)) > _SOCKET_PATH_BYTES_MAX:
        raise RpcError(f"the socket path {path} is longer than {_SOCKET_PATH_BYTES_MAX} bytes; use a shorter home")
    await _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The umask keeps the socket closed to others from the moment it exists; the chmod does not depend on it.
        # Binding synchronously keeps the process-wide umask change as short as possible.
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(_LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise RpcError(f"a node is already running at {path}; stop it before starting another") from None
        raise RpcError(f"cannot listen on {path}: {error}") from error
    return trio.socket.from_stdlib_socket(sock)


def _remove_socket_file(path: Path, bound: os.stat_result) -> None:
    """Remove the socket file at `path` if it is still the one this server bound."""
    try:
        current = os.lstat(path)
    except FileNotFoundError:
        return
    if (current.st_dev, current.st_ino) == (bound.st_dev, bound.st_ino):
        path.unlink(missing_ok=True)


async def serve_rpc(
    path: Path,
    handlers: Mapping[str, Handler],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    connections_max: int = CONNECTIONS_MAX,
    request_bytes_max: int = REQUEST_BYTES_MAX,
    timeouts_s: Mapping[str, float] | None = None,
) -> NoReturn:
    """Serve `handlers` on an owner-only Unix socket at `path` until cancelled, removing the socket file on exit;
    a method's handler may take `timeouts_s[method]` instead of `request_timeout_s`."""
    if min(request_timeout_s, idle_timeout_s) <= 0 or connections_max < 1 or request_bytes_max < 1:
        raise RpcError("rpc timeouts, connections_max and request_bytes_max must be positive")
    limits = _Limits(request_timeout_s, idle_timeout_s, connections_max, request_bytes_max)
    server = _Server(handlers, limits, timeouts_s or {})
    sock = await _bind(path)
    bound = os.lstat(path)
    try:
        async with trio.SocketListener(sock) as listener, trio.open_nursery() as nursery:
            task_status.started()
            await server.accept_forever(listener, nursery)
    finally:
        _remove_socket_file(path, bound)


class RpcClient:
    """A synchronous connection to a running node's RPC socket; each response must arrive within `timeout_s`."""

    def __init__(self, sock: socket.socket, timeout_s: float, response_bytes_max: int = RESPONSE_BYTES_MAX) -> None:
        self._sock = sock
        self._timeout_s = timeout_s
        self._buffer = FrameBuffer(response_bytes_max, _Oversized.RESPONSE)
        self._next_id = 1
        self._closed = False

    @classmethod
    def connect(cls, path: Path, timeout_s: float = CONNECT_TIMEOUT_S) -> RpcClient:
        """Connect to the node listening at `path`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise NodeNotRunning(f"no node is running at {path}; start one with `aico-node run`") from None
        except TimeoutError:
            sock.close()
            raise RpcTimeoutError(f"the node at {path} did not accept within {timeout_s} s") from None
        except OSError as error:
            sock.close()
            raise RpcError(f"cannot connect to {path}: {error}") from error
        return cls(sock, timeout_s)

    def call(self, method: str, /, **params: Any) -> Any:
        """Call `method` with `params` and return its result."""
        return self.call_keyed(method, params, None)

    def call_keyed(self, method: str, params: dict[str, Any], key: str | None) -> Any:
        """Call `method` with `params` and return its result; a call repeating `key` (of an earlier call, maybe on
        another connection) runs once and answers like the first, so a retry after a timeout never writes twice."""
        request_id = self._send_request(method, params, key)
        response = self._receive_response(request_id)
        if "result" not in response:
            self.close()
            raise RpcError(f"the node answered {method} without a result")
        return response["result"]

    def stream(self, method: str, /, **params: Any) -> Generator[Any, None, None]:
        """Call a streaming `method` and yield its items; leaving early closes this client."""
        request_id = self._send_request(method, params)
        finished = False
        try:
            while True:  # bounded by the node ending the stream; each item must arrive within the timeout
                response = self._receive_response(request_id)
                if response.get("end") is True:
                    finished = True
                    return
                if "stream" not in response:
                    raise RpcError(f"the node answered the stream {method} with a plain result")
                yield response["stream"]
        finally:
            # A stream left midway leaves frames in flight that no later call could tell apart from its own.
            if not finished:
                self.close()

    def close(self) -> None:
        """Close the connection; later calls raise RpcError."""
        self._closed = True
        self._sock.close()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _send_request(self, method: str, params: dict[str, Any], key: str | None = None) -> int:
        if self._closed:
            raise RpcError("the RPC client is closed")
        request_id = self._next_id
        self._next_id += 1
        request: dict[str, Any] = {"id": request_id, "method": method, "params": params}
        if key is not None:
            request["key"] = key
        try:
            frame = _frame(request)
        except (TypeError, ValueError, OverflowError) as error:
            raise RpcError(f"the params of {method} cannot be encoded: {error}") from error
        try:
            self._sock.settimeout(self._timeout_s)
            self._sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node refused the request midway; its answer, if any, is read next
        except TimeoutError:
            self.close()
            raise RpcTimeoutError(f"the node did not take the {method} request within {self._timeout_s} s") from None
        return request_id

    def _receive_response(self, request_id: int) -> dict[str, Any]:
        """Read the next response to `request_id`, raising RpcRemoteError if it is an error."""
        body = self._receive_body(time.monotonic() + self._timeout_s)
        try:
            response = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception:  # msgpack raises many exception types for bad input
            response = None
        if type(response) is dict and response.get("ok") is True and response.get("id") == request_id:
            return response
        # Errors the node raises before it could read the request's id (busy, too large, malformed) carry none.
        if type(response) is dict and response.get("ok") is False and response.get("id") in (request_id, None):
            error = response.get("error")
            if type(error) is dict and type(error.get("type")) is str and type(error.get("message")) is str:
                raise RpcRemoteError(error["type"], error["message"])
        self.close()
        raise RpcError(f"the node sent a malformed response to request {request_id}")

    def _receive_body(self, deadline: float) -> bytes:
        """The next response frame's body, received by `deadline` (monotonic seconds)."""
        try:
            while (body := self._buffer.next_body()) is None:  # bounded by the frame size and the deadline
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    raise TimeoutError
                self._sock.settimeout(remaining_s)
                chunk = self._sock.recv(_RECEIVE_CHUNK_BYTES)
                if not chunk:
                    self.close()
                    raise RpcError("the node closed the connection")
                self._buffer.feed(chunk)
        except RemoteProtocolError as error:
            self.close()
            raise RpcError(f"the node sent a response that is too large: {error.detail}") from None
        except TimeoutError:
            self.close()
            raise RpcTimeoutError(f"the node did not answer within {self._timeout_s} s") from None
        except OSError as error:
            self.close()
            raise RpcError(f"the connection to the node failed: {error}") from error
        return body
