"""The running node, wired together: identity and keys, stores, projector, bus, key rotation, the local API and, while
it runs, the network. The composition root: the parts live in node.trust, node.sync, node.net and node.api."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from crdt import Collection, Op
from node import bus as topics
from node.api.handlers import HANDLER_TIMEOUTS_S, AdminHandlers, DataHandlers, Handler
from node.api.rpc import serve_rpc
from node.bus import Bus
from node.embed import load_in_background
from node.errors import NodeError
from node.home import BOOTSTRAP_PEER, HomeLock, load_store_config, socket_path
from node.sync.receiver import Notifier, OpsReceiver
from node.trust.identity import DeviceIdentity, registry_refusal, unlock_identity
from node.trust.keyring import KeyRing
from node.trust.pairing import InviterPaired
from node.trust.rotation import KeyRotation
from stores.datalayer import DataLayer
from stores.primary import get_meta
from stores.projector import Projector
from stores.repositories import DataError, UnitOfWork

if TYPE_CHECKING:
    from node.net.network import Network, NetworkOptions

log = logging.getLogger(__name__)
# The topics a committed op may publish on.
_OP_TOPICS = (topics.USER_PREFERENCES_CHANGED, topics.CONVERSATION_MESSAGE_ADDED, topics.DATA_FORGOTTEN)


class Node:
    """One device's node: its stores, the projector, the bus, and the handlers behind the local socket."""

    def __init__(self, home: Path, identity: DeviceIdentity, data: DataLayer) -> None:
        self.home = home
        self.identity = identity
        self.data = data
        self.keyring = KeyRing(home, identity)
        self.rotation = KeyRotation(identity, self.keyring, lambda: data.replica)
        data.replica.admit_registry_op = registry_refusal
        self.bus = Bus()
        self.projector = Projector(data)
        self.outgoing = Notifier()  # wakes sessions and the mailbox when there are ops to send
        self.network: Network | None = None  # while the network runs
        # Sections that services started beside the node (its local page) add to `status`, by name.
        self.status_sections: dict[str, Callable[[], Any]] = {}
        self._nursery: trio.Nursery | None = None  # while serving
        self.data_handlers = DataHandlers(self)
        self.handlers: dict[str, Handler] = {**self.data_handlers.handlers(), **AdminHandlers(self).handlers()}

    @classmethod
    @asynccontextmanager
    async def opened(cls, home: Path, passphrase: str, holder: str) -> AsyncIterator[Node]:
        """Hold the home (as `holder`, a command line) and open its stores for the duration of the block; on exit
        drain the projector and close."""
        config = load_store_config(home)
        identity = unlock_identity(home, passphrase)
        async with HomeLock(home).held(holder):
            data = await DataLayer.open(home, identity.device_id, identity.store_key, config)
            node = cls(home, identity, data)
            try:
                yield node
            finally:
                with trio.CancelScope(shield=True):
                    try:
                        await node.projector.drain()
                    finally:
                        await data.close()

    def unit_of_work(self) -> UnitOfWork:
        """A unit of work whose commit projects, publishes and sends what it wrote."""
        return UnitOfWork(self.data, on_commit=self._committed)

    def _committed(self, ops: list[Op]) -> None:
        self.projector.wake()
        self.outgoing.notify()
        self._took(ops)

    def _applied(self, ops: list[Op]) -> None:
        """Publish remote changes that sync applied, and project them."""
        self.projector.wake()
        self.bus.publish(topics.SYNC_REMOTE_APPLIED, {"ops": len(ops)})
        self._took(ops)

    def _took(self, ops: Sequence[Op]) -> None:
        """Publish the ops' events, adopt keys rotated to this device, and drop the sessions of revoked devices."""
        self._publish_op_events(ops)
        taken = self.rotation.take(ops)
        if self.network is not None:
            if taken.revoked:
                self.network.sync.drop_devices(taken.revoked)
            if taken.adopted:
                self.network.sync.end_sessions()  # the new sessions pick the newest shared key
        if taken.revoked or taken.adopted:  # only these change which devices hold the current key, or who is revoked
            self._rotate_again_if_needed()

    def _rotate_again_if_needed(self) -> None:
        if self._nursery is not None and self.rotation.must_rotate_again():
            self._nursery.start_soon(self._rotate)

    async def _rotate(self) -> None:
        async with self.unit_of_work() as uow:
            self.rotation.stage(uow, excluding=self.identity.device_id)
            await uow.commit()

    def _publish_op_events(self, ops: Sequence[Op]) -> None:
        # A sync commits thousands of ops at once: with nobody listening, no op is looked at.
        if not self.bus.has_subscribers(*_OP_TOPICS):
            return
        for op in ops:
            if op.collection is Collection.PREFERENCES:
                self.bus.publish(topics.USER_PREFERENCES_CHANGED, {"preference_key": op.key, "new_value": op.payload})
            elif op.collection is Collection.MESSAGES and op.kind == "add":
                self.bus.publish(topics.CONVERSATION_MESSAGE_ADDED, {"message_id": op.key})
            elif op.collection in (Collection.MESSAGES, Collection.MEMORIES) and op.kind in ("delete", "remove"):
                self.bus.publish(topics.DATA_FORGOTTEN, {"collection": op.collection.value, "id": op.key})

    async def serve(
        self,
        network: NetworkOptions | None = None,
        *,
        load_analytics: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the projector, the bus services, the network (if `network`) and the local socket until cancelled; load
        the in-memory analytics store at once if `load_analytics`, else on first use (for a command that ends soon)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._rotate_again_if_needed()  # a rotation a crash cut short
                await nursery.start(functools.partial(self.projector.run, load_analytics=load_analytics))
                await nursery.start(self._memory_store_service)
                if network is not None:
                    self.network = await nursery.start(self._run_network, network)
                await nursery.start(
                    functools.partial(serve_rpc, timeouts_s=HANDLER_TIMEOUTS_S), socket_path(self.home), self.handlers
                )
                # Once serving, so that it delays no start: the first text memory then waits for the model at most.
                nursery.start_soon(load_in_background)
                task_status.started()
        finally:
            self._nursery = self.network = None

    async def _run_network(
        self, options: NetworkOptions, *, task_status: trio.TaskStatus[Network] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # libp2p takes ~0.7 s to import: only nodes that sync pay for it.
        from node.net.network import run_network

        bootstrap = await self.data.sql.run(get_meta, BOOTSTRAP_PEER)
        receiver = OpsReceiver(self.data, self.outgoing, self._applied)
        peers = {bootstrap["device_id"]: bootstrap["public_key"]} if bootstrap else {}
        await run_network(
            options, self.identity, self.keyring, receiver, peers, self._enrol_paired, task_status=task_status
        )

    async def _enrol_paired(self, paired: InviterPaired) -> None:
        async with self.unit_of_work() as uow:
            uow.devices.enrol(paired.peer_device_id, msgpack.unpackb(paired.enrolment_record))
            await uow.commit()

    async def _memory_store_service(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer the seed's `memory.store.request` events with `memory.store.complete`."""
        async with self.bus.subscribe(topics.MEMORY_STORE_REQUEST) as requests:
            task_status.started()
            async for event in requests:
                try:
                    result: dict[str, Any] = await self.data_handlers.memory_add(event.payload)
                    self.bus.publish(topics.MEMORY_STORE_COMPLETE, {"memory_id": result["id"], "status": "success"})
                except (DataError, NodeError) as error:
                    self.bus.publish(topics.MEMORY_STORE_COMPLETE, {"status": "error", "error": str(error)})
