"""Pairing over libp2p (`/aico/pair/1`): the inviter's handler and the joiner's run, around node.trust.pairing."""

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import overload

import msgpack
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from discovery.errors import DiscoveryError
from framing import RemoteProtocolError
from node.net.dial import dial_protocol
from node.net.host import P2pHost
from node.net.invite_advert import advertise_invite
from node.trust.identity import DeviceIdentity, GroupKey, enrolment_record
from node.trust.pairing import (
    NO_INVITE_OPEN,
    PROTOCOL_ID,
    Error,
    InviteGuard,
    InviterPaired,
    InviterSession,
    JoinerPaired,
    JoinerSession,
    PairingError,
    PairingReason,
    to_wire,
)
from p2p import CLOSE_TIMEOUT_S, StreamGone, close_quietly, read_chunk, send_pending, write_within

log = logging.getLogger(__name__)
PAIR_TIMEOUT_S = 120.0
DIAL_TIMEOUT_S = 10.0
PairingSession = InviterSession | JoinerSession


@overload
async def pump_pairing(stream: INetStream, session: InviterSession) -> InviterPaired: ...


@overload
async def pump_pairing(stream: INetStream, session: JoinerSession) -> JoinerPaired: ...


async def pump_pairing(stream: INetStream, session: PairingSession) -> InviterPaired | JoinerPaired:
    """Run one pairing session over a stream until it pairs, or raise PairingError / RemoteProtocolError."""
    with trio.fail_after(PAIR_TIMEOUT_S):
        try:
            while True:
                await send_pending(stream, session, PAIR_TIMEOUT_S)
                chunk = await read_chunk(stream)
                if not chunk:
                    raise PairingError(PairingReason.ABORTED, "the other device closed the connection")
                events = session.receive_data(chunk, time.time())
                if events:
                    await send_pending(stream, session, PAIR_TIMEOUT_S)  # the joiner's DONE
                    return events[0]
        except StreamGone as error:
            raise PairingError(PairingReason.ABORTED, f"the connection to the other device broke: {error}") from None
        except (PairingError, RemoteProtocolError):
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):  # tell the other side why, if there is an ERROR
                try:
                    await send_pending(stream, session, CLOSE_TIMEOUT_S)
                except StreamGone:
                    pass
            raise


class InviteDesk:
    """Answers pairing streams for the one open invite of this node, and advertises it on the LAN while it is open."""

    def __init__(
        self,
        identity: DeviceIdentity,
        group_key: Callable[[], GroupKey],
        host: P2pHost,
        enrol: Callable[[InviterPaired], Awaitable[None]],
        advertise_on_lan: bool = True,
    ) -> None:
        self.identity = identity
        self.group_key = group_key
        self.host = host
        self._enrol = enrol
        self.advertise_on_lan = advertise_on_lan
        self._open: tuple[InviteGuard, trio.MemorySendChannel] | None = None
        self._closed: InviteGuard | None = None  # the last invite closed: its refusal says why (used, expired...)
        self._advert: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        host.libp2p_host.set_stream_handler(TProtocol(PROTOCOL_ID), self._serve)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery the open invite's LAN advert runs in, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def open_invite(self, guard: InviteGuard) -> trio.MemoryReceiveChannel:
        """Make `guard`'s invite the open one, advertised on the LAN; the returned channel yields the joined device id
        or a PairingError."""
        send, receive = trio.open_memory_channel(4)
        self.close_invite()
        self._open = (guard, send)
        if self._nursery is not None and self.advertise_on_lan:
            self._advert = trio.CancelScope()
            self._nursery.start_soon(self._advertise, guard, self._advert)
        return receive

    async def _advertise(self, guard: InviteGuard, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await advertise_invite(guard.invite.code, self.host.addresses)
            except DiscoveryError as error:
                log.warning("the invite is not advertised on the LAN (give the joiner its address): %s", error)

    def close_invite(self, guard: InviteGuard | None = None) -> None:
        """Close the open invite (only if it is `guard`'s, when given) and withdraw its advert."""
        if self._open is None or (guard is not None and self._open[0] is not guard):
            return
        self._closed, self._open = self._open[0], None
        self._closed.withdraw()
        if self._advert is not None:
            self._advert.cancel()
            self._advert = None

    async def _serve(self, stream: INetStream) -> None:
        if self._open is None and self._closed is None:
            # Said, not just reset, so the joiner can tell the user what to do.
            refusal = Error(PairingReason.UNKNOWN_INVITE, NO_INVITE_OPEN)
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                with contextlib.suppress(StreamGone):
                    await write_within(stream, to_wire(refusal), CLOSE_TIMEOUT_S)
            await close_quietly(stream)
            return
        # With no invite open, the last one answers: its refusal says why it is closed.
        guard, report = self._open if self._open is not None else (self._closed, None)
        assert guard is not None  # one of the two is set (above)

        def enrolment_for(device_id: str, verify_key: bytes, name: str) -> bytes:
            record = enrolment_record(self.identity, device_id, verify_key, name)
            return msgpack.packb(record, use_bin_type=True)

        session = InviterSession(
            guard, self.identity, self.group_key(), enrolment_for, time.time(), self.host.addresses
        )
        try:
            paired = await pump_pairing(stream, session)
            await self._enrol(paired)
            _report(report, paired.peer_device_id)
        except (PairingError, RemoteProtocolError, trio.TooSlowError) as error:
            log.info("pairing attempt refused: %s", error)
            _report(
                report, error if isinstance(error, PairingError) else PairingError(PairingReason.ABORTED, str(error))
            )
        except Exception:
            # An error escaping a libp2p stream handler would stop the host: log it and drop this stream.
            log.exception("pairing handler failed")
        finally:
            await close_quietly(stream)


def _report(channel: trio.MemorySendChannel | None, outcome: object) -> None:
    if channel is None:
        return  # a closed invite: nobody waits for its outcome
    try:
        channel.send_nowait(outcome)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # nobody is waiting for this invite any more


async def join(host: P2pHost, identity: DeviceIdentity, code: str, address: str, name: str) -> JoinerPaired:
    """Pair, as `name`, with the inviting device at `address` using `code`; return what the inviter handed over."""
    session = JoinerSession(code, identity, time.time(), name=name)  # a malformed code fails before any dial
    _, stream = await dial_protocol(host, address, PROTOCOL_ID, timeout_s=DIAL_TIMEOUT_S)
    try:
        return await pump_pairing(stream, session)
    finally:
        await close_quietly(stream)
