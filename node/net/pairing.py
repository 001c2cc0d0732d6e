"""Pairing over libp2p (`/aico/pair/1`): the inviter's handler and the joiner's run, around node.trust.pairing."""

import logging
import time
from collections.abc import Awaitable, Callable
from typing import overload

import msgpack
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from framing import RemoteProtocolError
from node.net.dial import dial_protocol
from node.net.host import P2pHost
from node.trust.identity import DeviceIdentity, GroupKey, enrolment_record
from node.trust.pairing import (
    PROTOCOL_ID,
    InviteGuard,
    InviterPaired,
    InviterSession,
    JoinerPaired,
    JoinerSession,
    PairingError,
    PairingReason,
)
from p2p import CLOSE_TIMEOUT_S, StreamGone, close_quietly, read_chunk, reset_quietly, send_pending

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
    """Answers pairing streams for the one open invite of this node."""

    def __init__(
        self,
        identity: DeviceIdentity,
        group_key: Callable[[], GroupKey],
        host: P2pHost,
        enrol: Callable[[InviterPaired], Awaitable[None]],
    ) -> None:
        self.identity = identity
        self.group_key = group_key
        self.host = host
        self._enrol = enrol
        self._open: tuple[InviteGuard, trio.MemorySendChannel] | None = None
        host.libp2p_host.set_stream_handler(TProtocol(PROTOCOL_ID), self._serve)

    def open_invite(self, guard: InviteGuard) -> trio.MemoryReceiveChannel:
        """Make `guard`'s invite the open one; the returned channel yields the joined device id or a PairingError."""
        send, receive = trio.open_memory_channel(4)
        self._open = (guard, send)
        return receive

    def close_invite(self) -> None:
        self._open = None

    async def _serve(self, stream: INetStream) -> None:
        if self._open is None:
            await reset_quietly(stream)
            return
        guard, report = self._open

        def enrolment_for(device_id: str, verify_key: bytes) -> bytes:
            record = enrolment_record(self.identity, device_id, verify_key, "paired device")
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


def _report(channel: trio.MemorySendChannel, outcome: object) -> None:
    try:
        channel.send_nowait(outcome)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # nobody is waiting for this invite any more


async def join(host: P2pHost, identity: DeviceIdentity, code: str, address: str) -> JoinerPaired:
    """Pair with the inviting device at `address` using `code`; return what the inviter handed over."""
    _, stream = await dial_protocol(host, address, PROTOCOL_ID, timeout_s=DIAL_TIMEOUT_S)
    try:
        return await pump_pairing(stream, JoinerSession(code, identity, time.time()))
    finally:
        await close_quietly(stream)
