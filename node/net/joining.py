"""A new device joining its user's group: find the inviter (on the LAN from the code alone, or at given addresses),
pair over `/aico/pair/1`, and make the home; a join that fails says exactly why and leaves nothing in the home."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import trio

from node.errors import NodeError
from node.home import LOCK_FILE, HomeLock, identity_for_joining, init_joined_home
from node.net.host import DialError, p2p_host
from node.net.invite_advert import find_inviter
from node.net.pairing import join
from node.trust.identity import IDENTITY_FILE, DeviceIdentity
from node.trust.pairing import JoinerPaired, PairingError, PairingReason
from stores.datalayer import StoreConfig

log = logging.getLogger(__name__)
JOIN_LISTEN = ("/ip4/127.0.0.1/tcp/0",)  # the joiner only dials while it pairs: nothing to hand out

# What a person does about each way a join fails.
_ADVICE = {
    PairingReason.EXPIRED: "the invite has expired: make a new one on the other device (`aico-node pair invite`)",
    PairingReason.TOO_MANY_ATTEMPTS: "the invite allows no more attempts: make a new one on the other device",
    PairingReason.INVITE_USED: "the invite has already paired a device: make a new one on the other device",
}


class JoinError(NodeError):
    """A join that did not pair, with what the person can do about it."""


@attrs.frozen
class Joined:
    """A joined device: what the inviter handed over, and the address it answered at."""

    paired: JoinerPaired
    address: str


async def join_group(
    home: Path,
    passphrase: str,
    code: str,
    addresses: Sequence[str],
    name: str,
    say: Callable[[str], None],
) -> Joined:
    """Pair the device of `home` (fresh) with the inviter of `code` at `addresses`, found on the LAN when empty; make
    the home. On failure raise JoinError and remove whatever this join put in the home."""
    made_home = not home.exists()
    made_identity = not (home / IDENTITY_FILE).exists()
    try:
        async with HomeLock(home).held("aico-node pair join"):
            identity = identity_for_joining(home, passphrase)
            if not addresses:
                say("looking for the inviting device on this network ...")
                addresses = await find_inviter(code)
                if not addresses:
                    raise JoinError(
                        "no invite for this code answers on this network: is `aico-node pair invite` running on the "
                        "other device, on the same network, and not expired? Else give its address with --address (the "
                        "invite shows it)"
                    )
            joined = await _pair(identity, code, addresses, name)
            await init_joined_home(home, identity, joined.paired, StoreConfig())
            return joined
    except BaseException:
        if made_identity:
            (home / IDENTITY_FILE).unlink(missing_ok=True)
        if made_home:
            with contextlib.suppress(OSError):
                (home / LOCK_FILE).unlink(missing_ok=True)
                home.rmdir()  # only if empty: nothing but what this join made
        raise


async def _pair(identity: DeviceIdentity, code: str, addresses: Sequence[str], name: str) -> Joined:
    failures = []
    async with p2p_host(identity, JOIN_LISTEN) as host:
        for address in addresses:
            try:
                return Joined(await join(host, identity, code, address, name), address)
            except DialError as error:
                failures.append(str(error))  # another address may answer; a run that started is never retried
            except PairingError as error:
                raise JoinError(_ADVICE.get(error.reason, error.detail)) from None
            except trio.TooSlowError:
                raise JoinError(f"the inviting device at {address} stopped answering; try again") from None
    raise JoinError(f"cannot reach the inviting device: {'; '.join(failures)}")
