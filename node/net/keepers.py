"""Keeping a session with every device of the group: each is dialled at the addresses it was last seen at (and
through the relay, if there is one) whenever no session with it runs, so paired devices find each other again after
restarts with no flags."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import multiaddr
import trio

from node.errors import NodeError
from node.net.circuit import is_circuit_addr, split_circuit_addr
from node.net.relay_path import keep_connected_with_relay
from node.net.sessions import SyncService

log = logging.getLogger(__name__)
CHECK_EVERY_S = 5.0  # how often devices trusted since get a keeper
KEEPERS_MAX = 256
# Of two devices that both dial, the one with the higher id waits this long first, so the lower id's dial usually
# wins and neither resets the other's stream.
HIGHER_ID_WAIT_S = (1.0, 3.0)


class _NoLongerTrusted(NodeError):
    """The device was revoked: it is not dialled again."""


class DeviceKeepers:
    """One dialling loop per trusted device, and the addresses the user gave (`--peer`) put in the address book."""

    def __init__(
        self,
        sync: SyncService,
        *,
        dial_timeout_s: float = 5.0,
        backoff_s_min: float = 0.5,
        backoff_s_max: float = 30.0,
    ) -> None:
        self.sync = sync
        self.dial_timeout_s = dial_timeout_s
        self.backoff_s_min = backoff_s_min
        self.backoff_s_max = backoff_s_max
        self._kept: set[str] = set()
        self._relay_of: dict[str, str] = {}  # devices given as a circuit address: the relay to reach them through

    async def give(self, addresses: Sequence[str]) -> None:
        """Remember the addresses given on the command line (`--peer`), each under the device it names, the likeliest
        first."""
        for address in addresses:
            device_id = _device_of(address)
            if is_circuit_addr(address):
                # The first relay given for a device stays: the address that worked (for pairing) comes first.
                self._relay_of.setdefault(device_id, split_circuit_addr(address)[0])
            else:
                await self.sync.book.learn(device_id, [address], "given")
            if not self.sync.is_trusted(device_id):
                log.warning(
                    "--peer %s names %s, which is not (or not yet) one of this user's devices: it is dialled only "
                    "once paired (`aico-node pair`)", address, device_id,
                )  # fmt: skip

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start a keeper for each trusted device, now and as devices are enrolled, until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                for device_id in self.sync.known_devices():
                    if device_id not in self._kept and len(self._kept) < KEEPERS_MAX and self.sync.is_trusted(device_id):
                        self._kept.add(device_id)
                        nursery.start_soon(self._keep, device_id)
                await trio.sleep(CHECK_EVERY_S)

    async def _keep(self, device_id: str) -> None:
        """Dial `device_id` whenever no session with it runs, with backoff, until it is revoked."""
        peer = self.sync.book.get(device_id)
        higher_id = device_id < self.sync.identity.device_id

        def relay() -> str | None:
            return self._relay_of.get(device_id, self.sync.relay)

        first_attempt = True

        async def until_worth_dialling() -> None:
            nonlocal first_attempt
            while True:
                await peer.offline.wait()
                if not self.sync.is_trusted(device_id):
                    raise _NoLongerTrusted(device_id)
                if not peer.addresses and relay() is None:
                    await peer.learned.wait()  # nowhere to dial yet: mDNS or the user will say
                    continue
                # Not before the first: the other device may not know where this one listens since it started (a new
                # port), so its dial may never come; a crossing dial is kept out by the session handshake.
                if higher_id and not first_attempt:
                    await trio.sleep(random.uniform(*HIGHER_ID_WAIT_S))
                first_attempt = False
                if not peer.online:
                    return

        try:
            await keep_connected_with_relay(
                self.sync.host, lambda: list(peer.addresses), relay, device_id, self.sync.serve_stream,
                before_attempt=until_worth_dialling, dial_timeout_s=self.dial_timeout_s,
                backoff_s_min=self.backoff_s_min, backoff_s_max=self.backoff_s_max,
            )  # fmt: skip
        except _NoLongerTrusted:
            log.info("stopped dialling %s: it was revoked", device_id)


def _device_of(address: str) -> str:
    """The device id a multiaddr ends in (`.../p2p/<id>`, a circuit address's last one)."""
    if is_circuit_addr(address):
        return split_circuit_addr(address)[1]
    return str(multiaddr.Multiaddr(address).value_for_protocol("p2p"))
