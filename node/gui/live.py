"""What the page shows, built from the node's handlers, rebuilt when its bus reports a change; and the page's invite."""

import io
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import segno
import trio

from node.api.rpc import Handler
from node.gui.errors import GuiRequestError
from node.trust.pairing import invite_payload

log = logging.getLogger(__name__)
HANDLER_TIMEOUT_S = 30.0
CONFLICTS_SHOWN = 50
# Changes the bus does not announce (a device coming online, the projector's backlog) show within this.
REFRESH_EVERY_S = 1.0
SETTLE_S = 0.05  # a burst of bus events makes one rebuild
WATCHERS_MAX = 8
HEARTBEAT_S = 15.0  # a quiet event stream still sends this often, so a closed page is noticed
FIRST_UPDATE_TIMEOUT_S = 10.0
QR_SCALE = 4
QR_BORDER = 4  # modules of quiet zone, as the QR standard asks


class EventBus(Protocol):
    """Events as the node's bus delivers them: any event is a change the page may show."""

    def subscribe(self, pattern: str) -> AbstractAsyncContextManager[AsyncIterator[Any]]: ...


class NodeView(Protocol):
    """All the page needs of a node: the handlers behind its local socket, and its bus.

    It calls "status", "devices.list", "conflicts" and "devices.revoke" with the params and results `aico-node`'s
    socket has (README.md), and "pair.invite", whose result's `items` yield the invite's progress: first
    {"code", "addresses", "expires"}, then {"refused", "attempts_left"}, {"paired": device} or {"expired": true}.
    """

    handlers: Mapping[str, Handler]
    bus: EventBus


async def call(node: NodeView, method: str, params: dict | None = None) -> Any:
    """Call one of the node's handlers, within HANDLER_TIMEOUT_S."""
    handler = node.handlers.get(method)
    if handler is None:
        raise GuiRequestError(f"this node has no {method!r} handler", 501)
    try:
        with trio.fail_after(HANDLER_TIMEOUT_S):
            return await handler(params or {})
    except trio.TooSlowError:
        raise GuiRequestError(f"the node did not answer {method} within {HANDLER_TIMEOUT_S} s", 504) from None


def _json_default(value: Any) -> Any:
    """JSON for the few values msgpack holds and JSON does not (bytes in conflict values)."""
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    return str(value)


def to_json(value: Any) -> str:
    return json.dumps(value, default=_json_default, separators=(",", ":"))


async def page_state(node: NodeView, invite: dict | None) -> dict:
    """The page's whole state: this device, every device of the group, the relay, the conflict journal, the invite."""
    status = await call(node, "status")
    registry = await call(node, "devices.list")
    conflicts = await call(node, "conflicts", {"limit": CONFLICTS_SHOWN})
    this_id = status["device_id"]
    peers = {peer["device_id"]: peer for peer in status["peers"]}
    records = {record["device"]: record for record in registry}
    devices = []
    # A joined device trusts its inviter before the registry has synced: such a device is listed without a name.
    for device_id in sorted(set(records) | set(peers), key=lambda d: (d != this_id, d)):
        record, peer = records.get(device_id, {}), peers.get(device_id, {})
        devices.append(
            {
                "device_id": device_id,
                "name": record.get("name"),
                "this": device_id == this_id,
                "revoked": bool(record.get("revoked")),
                "online": peer.get("online", False),
                "path": peer.get("path"),
                "last_seen": peer.get("last_sync"),
                "ops_behind_in": peer.get("ops_behind_in"),
                "ops_behind_out": peer.get("ops_behind_out"),
                "bytes_in": peer.get("bytes_in"),
                "bytes_out": peer.get("bytes_out"),
            }
        )
    this = {
        "device_id": this_id,
        "name": records.get(this_id, {}).get("name"),
        "epoch": status["group_epoch"],
        "revoked": status["revoked"],
        "engine": status["engine"],
        "ops": status["ops"],
        "ops_stored": status["ops_stored"],
        "stores": status.get("stores"),
        "addresses": status["addresses"],
    }
    return {"this": this, "devices": devices, "relay": status["relay"], "conflicts": conflicts, "invite": invite}


class LiveFeed:
    """The page state for every open page: rebuilt at once when the bus reports a change and every REFRESH_EVERY_S,
    but only while a page watches, so a node nobody looks at does no work for the page and keeps its bus quiet."""

    def __init__(self, node: NodeView, build: Callable[[], Awaitable[dict]]) -> None:
        self._node = node
        self._build = build
        self._state: str | None = None  # JSON; None while nobody watches, as it is not kept current then
        self._version = 0
        self._changed = trio.Event()
        self._dirty = trio.Event()
        self._watched = trio.Event()
        self._last_error: str | None = None
        self.watchers = 0

    def poke(self) -> None:
        """Rebuild the state now (something changed that the bus does not report)."""
        self._dirty.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the state current while pages watch, until cancelled."""
        task_status.started()
        while True:
            if not self.watchers:
                self._watched = trio.Event()
                await self._watched.wait()
            async with self._node.bus.subscribe("*") as events, trio.open_nursery() as nursery:
                nursery.start_soon(self._dirty_on_events, events)
                while self.watchers:
                    self._dirty = trio.Event()
                    await self._rebuild()
                    with trio.move_on_after(REFRESH_EVERY_S):
                        await self._dirty.wait()
                        await trio.sleep(SETTLE_S)
                nursery.cancel_scope.cancel()
            self._state = None

    async def _dirty_on_events(self, events: AsyncIterator[Any]) -> None:
        async for _ in events:  # bounded by the subscription's life
            self._dirty.set()

    async def _rebuild(self) -> None:
        try:
            state = to_json(await self._build())
        except Exception as error:  # the page must never take the node down: keep the last state and try again
            message = f"{type(error).__name__}: {error}"
            if message != self._last_error:  # once, not every second
                log.warning("the page state could not be built: %s", message)
            self._last_error = message
            return
        self._last_error = None
        if state != self._state:
            self._state, self._version = state, self._version + 1
            self._changed.set()
            self._changed = trio.Event()

    async def watch(self) -> AsyncGenerator[str | None, None]:
        """Yield the state (JSON) now and after each change, and None after HEARTBEAT_S without one."""
        if self.watchers >= WATCHERS_MAX:
            raise GuiRequestError(f"at most {WATCHERS_MAX} pages can be open at once; close one", 503)
        self.watchers += 1
        self._watched.set()
        self.poke()
        # A state built while other pages watch is current; else wait for the one the poke builds.
        seen = self._version if self._state is None else 0
        try:
            while True:  # until the page closes its stream, which cancels this
                if self._version == seen:
                    with trio.move_on_after(HEARTBEAT_S):
                        await self._changed.wait()
                if self._version == seen:
                    yield None
                else:
                    seen = self._version
                    yield self._state
        finally:
            self.watchers -= 1


class InviteSlot:
    """The page's invite, one at a time: its code and QR code while open, then how it ended."""

    def __init__(self, node: NodeView, nursery: trio.Nursery, on_change: Callable[[], None]) -> None:
        self._node = node
        self._nursery = nursery
        self._on_change = on_change
        self.view: dict | None = None
        self.qr_svg: bytes | None = None
        self._scope: trio.CancelScope | None = None

    async def open(self) -> dict:
        """Open an invite on the node and follow it in the background; return what the page shows of it."""
        if self._scope is not None:
            raise GuiRequestError("an invite is already open: cancel it first", 409)
        self._scope = scope = trio.CancelScope()  # taken now: a second request meanwhile is refused, not run twice
        try:
            items = (await call(self._node, "pair.invite")).items
            try:
                with trio.fail_after(FIRST_UPDATE_TIMEOUT_S):
                    first = await anext(items)
            except BaseException:
                await items.aclose()
                raise
        except BaseException:
            self._scope = None
            raise
        payload = invite_payload(first["code"], first["addresses"])
        self.view = {
            "code": first["code"],
            "addresses": json.loads(payload)["addresses"],
            "expires": first["expires"],
            "outcome": "waiting",
            "paired": None,
            "attempts_left": None,
        }
        self.qr_svg = qr_svg(payload)
        self._nursery.start_soon(self._follow, items, scope)
        self._on_change()
        return self.view

    def cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def _follow(self, items: AsyncGenerator[dict, None], scope: trio.CancelScope) -> None:
        try:
            with scope:
                # Bounded: the node ends the stream when the invite pairs, expires or runs out of attempts.
                async for update in items:
                    if "paired" in update:
                        self._update(outcome="paired", paired=update["paired"])
                    elif "refused" in update:
                        self._update(attempts_left=update["attempts_left"])
                        if update["attempts_left"] == 0:
                            self._update(outcome="no attempts left")
                    elif update.get("expired"):
                        self._update(outcome="expired")
        except Exception as error:  # the node's invite failed: say so on the page, and keep the node running
            log.warning("the page's invite failed: %s: %s", type(error).__name__, error)
            self._update(outcome=f"failed: {error}")
        finally:
            with trio.move_on_after(1.0, shield=True):
                await items.aclose()  # closes the node's invite
            if self.view is not None and self.view["outcome"] == "waiting":
                self._update(outcome="cancelled")
            self._scope = self.qr_svg = None

    def _update(self, **changes: Any) -> None:
        self.view = {**(self.view or {}), **changes}
        self._on_change()


def qr_svg(payload: str) -> bytes:
    """The QR code of `payload` as a standalone SVG document."""
    buffer = io.BytesIO()
    segno.make(payload, error="l").save(buffer, kind="svg", scale=QR_SCALE, border=QR_BORDER, xmldecl=False)
    return buffer.getvalue()
