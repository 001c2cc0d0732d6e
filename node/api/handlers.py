"""The node's local API: one handler per RPC method, each taking the request's params, working through the
repositories and the running services only."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from node.api.params import (
    IMPORT_BATCH_RECORDS_MAX,
    IMPORT_KINDS,
    ParamError,
    checked_import_record,
    checked_metadata,
    checked_name,
    checked_text,
)
from node.api.rpc import Handler, StreamedReply
from node.bus import Bus
from node.embed import default_embedder
from node.errors import NodeError
from node.trust.identity import DeviceIdentity, revocation_record
from node.trust.keyring import KeyRing
from node.trust.pairing import INVITE_TTL_S, InviteGuard, display_code, new_invite
from node.trust.rotation import KeyRotation
from stores.analytics import AnalyticsStore
from stores.datalayer import DataLayer
from stores.projector import Projector
from stores.repositories import DataError, UnitOfWork
from stores.vectors import VectorIndex

if TYPE_CHECKING:
    from node.net.network import Network

# Methods that may take longer than the socket's default 30 s: a rebuild of every derived store, a text embedded while
# the model is still loading, the first analytics query after a start.
HANDLER_TIMEOUTS_S = {
    "rebuild": 1800.0,
    "import.batch": 300.0,
    "memory.add": 120.0,
    "memory.search": 120.0,
    "analytics.daily": 120.0,
    "digest": 120.0,  # a million messages hash in about 8 s, after any catch-up holding the write lock
}
LIST_LIMIT = 50  # items msg.list and memory.list return unless asked for another number
LIST_LIMIT_MAX = 10_000
SEARCH_K_MAX = 1000


class NetworkOff(NodeError):
    """A request that needs the node's network, made while it does not run."""

    rpc_error_type = "bad_home"


class NodeParts(Protocol):
    """What the handlers use of a node: its identity and keys, its stores and services, and its network if it runs."""

    identity: DeviceIdentity
    keyring: KeyRing
    rotation: KeyRotation
    data: DataLayer
    bus: Bus
    projector: Projector
    network: Network | None
    status_sections: dict[str, Callable[[], Any]]

    def unit_of_work(self) -> UnitOfWork: ...


def name_param(params: dict[str, Any], name: str) -> str:
    """The parameter `name` as a short label (a key, an id, a conversation or note name); ParamError otherwise."""
    return checked_name(params.get(name), name)


def text_param(params: dict[str, Any], name: str, *, empty_ok: bool = False) -> str:
    """The parameter `name` as a (non-empty unless `empty_ok`) text within the size limit; ParamError otherwise."""
    return checked_text(params.get(name), name, empty_ok=empty_ok)


def limit_param(params: dict[str, Any], default: int, most: int) -> int:
    """The `limit` parameter: an integer from 1 to `most`, `default` when absent; ParamError otherwise."""
    limit = params.get("limit", default)
    if type(limit) is not int or not 1 <= limit <= most:
        raise ParamError(f"limit must be an integer from 1 to {most}")
    return limit


class DataHandlers:
    """The data a person or the companion reads and writes: preferences, messages, memories, notes, counters."""

    def __init__(self, node: NodeParts) -> None:
        self.node = node

    def handlers(self) -> dict[str, Handler]:
        """The RPC methods this class answers."""
        return {
            "pref.set": self.pref_set,
            "pref.get": self.pref_get,
            "pref.list": self.pref_list,
            "msg.add": self.msg_add,
            "msg.get": self.msg_get,
            "msg.list": self.msg_list,
            "memory.add": self.memory_add,
            "memory.search": self.memory_search,
            "memory.list": self.memory_list,
            "note.edit": self.note_edit,
            "note.show": self.note_show,
            "note.list": self.note_list,
            "counter.add": self.counter_add,
            "counter.get": self.counter_get,
            "session.set": self.session_set,
            "session.get": self.session_get,
            "forget": self.forget,
            "analytics.daily": self.analytics_daily,
            "digest": self.digest,
            "conflicts": self.conflicts,
            "rebuild": self.rebuild,
            "import.batch": self.import_batch,
        }

    async def pref_set(self, params: dict[str, Any]) -> dict[str, Any]:
        async with self.node.unit_of_work() as uow:
            uow.preferences.set(name_param(params, "key"), params.get("value"))
            await uow.commit()
        return {"key": params["key"], "value": params.get("value")}

    async def pref_get(self, params: dict[str, Any]) -> Any:
        async with self.node.unit_of_work() as uow:
            return await uow.preferences.get(name_param(params, "key"))

    async def pref_list(self, params: dict[str, Any]) -> dict[str, Any]:
        async with self.node.unit_of_work() as uow:
            return await uow.preferences.all()

    async def msg_add(self, params: dict[str, Any]) -> dict[str, Any]:
        async with self.node.unit_of_work() as uow:
            message_id = uow.conversations.add_message(
                name_param(params, "conversation"),
                text_param(params, "text"),
                role=params.get("role") or "user",
                sentiment=params.get("sentiment"),
                response_time_ms=params.get("response_time_ms"),
            )
            await uow.commit()
        return {"id": message_id}

    async def msg_list(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        conversation = name_param(params, "conversation")
        limit = limit_param(params, LIST_LIMIT, LIST_LIMIT_MAX)
        async with self.node.unit_of_work() as uow:
            messages = await uow.conversations.messages(conversation, limit)
        return [attrs.asdict(message) for message in messages]

    async def msg_get(self, params: dict[str, Any]) -> dict[str, Any] | None:
        async with self.node.unit_of_work() as uow:
            message = await uow.conversations.get(name_param(params, "id"))
        return None if message is None else attrs.asdict(message)

    async def embedding_of(self, params: dict[str, Any]) -> Any:
        """Return the request's embedding, or embed its text with the optional local model."""
        if params.get("embedding") is not None:
            return params["embedding"]
        text = text_param(params, "text")
        embedder = default_embedder()
        return (await trio.to_thread.run_sync(embedder.embed, [text]))[0]

    async def memory_add(self, params: dict[str, Any]) -> dict[str, Any]:
        embedding = await self.embedding_of(params)
        async with self.node.unit_of_work() as uow:
            metadata = checked_metadata(params.get("metadata") or {}, "metadata")
            memory_id = uow.memories.save_memory(text_param(params, "text"), embedding, metadata)
            await uow.commit()
        return {"id": memory_id}

    async def memory_search(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        where = params.get("where")
        where = None if where is None else checked_metadata(where, "where")
        k = params.get("k", 5)
        if type(k) is not int or not 1 <= k <= SEARCH_K_MAX:
            raise ParamError(f"k must be an integer from 1 to {SEARCH_K_MAX}")
        embedding = await self.embedding_of(params)
        await self.node.projector.drain()  # so a memory stored just before is found
        async with self.node.unit_of_work() as uow:
            found = await uow.memories.get_memories_by_context(embedding, k, where)
        return [attrs.asdict(memory) for memory in found]

    async def memory_list(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        limit = limit_param(params, LIST_LIMIT, LIST_LIMIT_MAX)
        async with self.node.unit_of_work() as uow:
            memories = await uow.memories.list(limit)
        return [{"id": memory.id, "text": memory.text, "metadata": memory.metadata} for memory in memories]

    async def note_edit(self, params: dict[str, Any]) -> dict[str, Any]:
        async with self.node.unit_of_work() as uow:
            uow.notes.edit(name_param(params, "name"), text_param(params, "text", empty_ok=True))
            await uow.commit()
        return {"name": params["name"]}

    async def note_show(self, params: dict[str, Any]) -> str | None:
        async with self.node.unit_of_work() as uow:
            return await uow.notes.get(name_param(params, "name"))

    async def note_list(self, params: dict[str, Any]) -> list[str]:
        async with self.node.unit_of_work() as uow:
            return await uow.notes.names()

    async def counter_add(self, params: dict[str, Any]) -> dict[str, Any]:
        delta = params.get("delta", 1)
        if type(delta) is not int or abs(delta) > 1 << 40:
            raise DataError("delta must be an integer")
        async with self.node.unit_of_work() as uow:
            uow.counters.increment(name_param(params, "name"), delta)
            await uow.commit()
        return {"name": params["name"]}

    async def counter_get(self, params: dict[str, Any]) -> int:
        async with self.node.unit_of_work() as uow:
            return await uow.counters.get(name_param(params, "name"))

    async def session_set(self, params: dict[str, Any]) -> dict[str, Any]:
        async with self.node.unit_of_work() as uow:
            uow.session.set(name_param(params, "key"), params.get("value"), params.get("ttl_s", 3600.0))
        return {"key": params["key"]}

    async def session_get(self, params: dict[str, Any]) -> Any:
        async with self.node.unit_of_work() as uow:
            return uow.session.get(name_param(params, "key"))

    async def forget(self, params: dict[str, Any]) -> dict[str, Any]:
        kind = params.get("kind")
        async with self.node.unit_of_work() as uow:
            if kind == "message":
                uow.conversations.forget(name_param(params, "id"))
            elif kind == "memory":
                uow.memories.forget(name_param(params, "id"))
            else:
                raise DataError(f"can forget a message or a memory, not {kind!r}")
            await uow.commit()
        await self.node.projector.drain()  # gone from the derived stores too before we answer
        return {"forgotten": params["id"]}

    async def import_batch(self, params: dict[str, Any]) -> dict[str, Any]:
        """Store a batch of history records (params.checked_import_record) in one commit, skipping those already here."""
        records = params.get("records")
        if not isinstance(records, list) or not 0 < len(records) <= IMPORT_BATCH_RECORDS_MAX:
            raise ParamError(f"records must be a list of 1 to {IMPORT_BATCH_RECORDS_MAX} records")
        checked = []
        for number, record in enumerate(records, 1):
            try:
                checked.append(checked_import_record(record))
            except ParamError as error:
                raise ParamError(f"record {number} of the batch: {error}") from None
        return await self.import_checked(checked)

    async def import_checked(self, checked: list[dict[str, Any]]) -> dict[str, Any]:
        """Store history records that passed params.checked_import_record, as `import_batch` does."""
        async with self.node.unit_of_work() as uow:
            seen = uow.conversations.known(r["id"] for r in checked if r["type"] == "message")
            seen |= uow.memories.known(r["id"] for r in checked if r["type"] == "memory")
            fresh = []
            for record in checked:
                if "id" in record:
                    if record["id"] in seen:  # stored before, or twice in this batch
                        continue
                    seen.add(record["id"])
                fresh.append(record)
            texts = [r["text"] for r in fresh if r["type"] == "memory" and r["embedding"] is None]
            if texts:
                embedded = iter(await trio.to_thread.run_sync(default_embedder().embed, texts))
            added = dict.fromkeys(IMPORT_KINDS, 0)
            for record in fresh:
                kind = record["type"]
                if kind == "message":
                    fields = {name: record[name] for name in ("role", "ts_ms", "sentiment", "response_time_ms")}
                    uow.conversations.add_message(record["conversation"], record["text"], **fields, message_id=record["id"])
                elif kind == "memory":
                    embedding = record["embedding"] if record["embedding"] is not None else next(embedded)
                    uow.memories.save_memory(record["text"], embedding, record["metadata"], memory_id=record["id"])
                elif kind == "preference":
                    if await uow.preferences.get(record["key"]) == record["value"]:
                        continue
                    uow.preferences.set(record["key"], record["value"])
                elif await uow.notes.get(record["name"]) != record["text"]:
                    uow.notes.edit(record["name"], record["text"])
                else:
                    continue
                added[kind] += 1
            await uow.commit()
        # The derived stores keep up batch by batch, so a long import never leaves a long backlog behind it.
        await self.node.projector.drain()
        return {"records": len(checked), "added": added, "skipped": len(checked) - sum(added.values())}

    async def analytics_daily(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        days = int(params.get("days", 30))
        if not 1 <= days <= 3660:
            raise DataError("days must be between 1 and 3660")
        await self.node.projector.drain()
        now_ms = time.time_ns() // 1_000_000
        rows = await self.node.data.in_analytics(lambda analytics: analytics.daily(days, now_ms))
        return [{**attrs.asdict(row), "day": row.day.isoformat()} for row in rows]

    async def digest(self, params: dict[str, Any]) -> dict[str, Any]:
        # The views are taken under the write lock that every change to the replica is made under, so they show one
        # state; hashed on a worker thread after it (a million messages take seconds), while writes go on.
        async with self.node.data.write_lock:
            views = self.node.data.replica.views()
        return attrs.asdict(await trio.to_thread.run_sync(views.digest))

    async def conflicts(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self.node.unit_of_work() as uow:
            lost = await uow.conflicts.recent(int(params.get("limit", 100)))
        return [attrs.asdict(value) for value in lost]

    async def rebuild(self, params: dict[str, Any]) -> dict[str, int]:
        return await self.node.projector.rebuild()


class AdminHandlers:
    """This device, its group and its services: status, devices, pairing, and the bus."""

    def __init__(self, node: NodeParts) -> None:
        self.node = node

    def handlers(self) -> dict[str, Handler]:
        """The RPC methods this class answers."""
        return {
            "status": self.status,
            "devices.list": self.devices_list,
            "devices.revoke": self.devices_revoke,
            "pair.invite": self.pair_invite,
            "bus.publish": self.bus_publish,
            "bus.subscribe": self.bus_subscribe,
        }

    async def status(self, params: dict[str, Any]) -> dict[str, Any]:
        node, network = self.node, self.node.network
        data = node.data
        peers = network.sync.status(network.mailbox) if network else []
        status = {
            "device_id": node.identity.device_id,
            "name": data.replica.devices.name(node.identity.device_id),
            "group_epoch": node.keyring.current.epoch,
            "revoked": data.replica.devices.revoked_at(node.identity.device_id) is not None,
            "addresses": network.host.addresses if network else [],
            "peers": peers,
            "relay": network.relay_status() if network else None,
            "engine": data.config.engine,
            "ops": data.replica.vector.total(),
            "ops_stored": data.ops_stored,
            # A state snapshot being received, in messages merged of about how many: null when none is.
            "state_received": None if data.state_progress is None else list(data.state_progress),
        }
        status.update((name, section()) for name, section in node.status_sections.items())
        if params.get("stores", True):
            # Counting opens Chroma and loads DuckDB on first use: `stores=false` spares a caller polling progress.
            status["stores"] = await self._store_counts()
        return status

    async def _store_counts(self) -> dict[str, int]:
        data = self.node.data
        async with self.node.unit_of_work() as uow:
            counts = await uow.totals.counts()
        return {
            "messages": counts.messages,
            "memories": counts.memories,
            "analytics_rows": await data.in_analytics(AnalyticsStore.count),
            "vector_items": await data.in_vectors(VectorIndex.count),
            "projector_backlog": counts.projector_backlog,
        }

    async def devices_list(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self.node.unit_of_work() as uow:
            devices = await uow.devices.list()
        return [{**d, "public_key": d["public_key"].hex(), "signature": d["signature"].hex()} for d in devices]

    async def devices_revoke(self, params: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        device_id = params.get("device")
        devices = node.data.replica.devices
        if device_id == node.identity.device_id:
            raise DataError("a device cannot revoke itself; revoke it from another of this user's devices")
        if not isinstance(device_id, str) or devices.get(device_id) is None:
            raise DataError(f"{device_id!r} is not an enrolled device; `aico-node devices` lists them")
        if devices.revoked_at(device_id) is not None:
            raise DataError(f"{device_id} is already revoked")
        async with node.unit_of_work() as uow:
            reason = str(params.get("reason") or "")
            # Its ops past what this device has applied from it will have no effect, whatever their stamps.
            cutoff_seq = node.data.replica.seq_of(device_id)
            uow.devices.revoke(device_id, revocation_record(node.identity, device_id, reason, cutoff_seq))
            keeping = node.rotation.stage(uow, excluding=device_id)
            await uow.commit()
        return {"revoked": device_id, "epoch": node.keyring.current.epoch, "key_sent_to": keeping}

    async def pair_invite(self, params: dict[str, Any]) -> StreamedReply:
        network = self.node.network
        if network is None:
            raise NetworkOff("pairing needs the node's network: start it with `aico-node run`")
        ttl_s = float(params.get("ttl_s", INVITE_TTL_S))
        guard = InviteGuard(new_invite(time.time(), ttl_s))
        outcomes = network.desk.open_invite(guard)
        desk, addresses = network.desk, network.host.addresses

        async def progress() -> AsyncGenerator[dict[str, Any], None]:
            try:
                invite = guard.invite
                yield {"code": display_code(invite.code), "addresses": addresses, "expires": invite.expires_at_s}
                with trio.move_on_at(trio.current_time() + ttl_s):
                    async for outcome in outcomes:
                        if isinstance(outcome, str):
                            yield {"paired": outcome, "name": self.node.data.replica.devices.name(outcome)}
                            return
                        yield {"refused": outcome.reason.value, "attempts_left": guard.attempts_left}
                        if guard.attempts_left == 0:
                            return
                yield {"expired": True}
            finally:
                desk.close_invite(guard)

        return StreamedReply(progress())

    async def bus_publish(self, params: dict[str, Any]) -> dict[str, Any]:
        payload = params.get("payload") or {}
        if not isinstance(payload, dict):
            raise DataError("bus payload must be a map")
        return {"delivered": self.node.bus.publish(name_param(params, "topic"), payload)}

    async def bus_subscribe(self, params: dict[str, Any]) -> StreamedReply:
        pattern = name_param(params, "pattern")
        bus = self.node.bus

        async def events() -> AsyncGenerator[dict[str, Any], None]:
            async with bus.subscribe(pattern) as subscription:
                async for event in subscription:
                    yield {"topic": event.topic, "payload": event.payload}

        return StreamedReply(events())
