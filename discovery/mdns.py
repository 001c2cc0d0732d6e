"""LAN discovery over mDNS/DNS-SD with python-zeroconf, bound to chosen interfaces and driven from trio."""

from __future__ import annotations

import collections
import contextlib
import functools
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self, TypeVar

import attrs
import trio
from zeroconf import Error as ZeroconfLibraryError
from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from discovery.advert import build_txt, check_addresses, open_txt, peer_hint
from discovery.errors import DiscoveryError, ZeroconfError
from discovery.tags import BUCKET_S, check_group_secret, discovery_tag, time_bucket

SERVICE_TYPE = "_aico-sync._tcp.local."
FOUND_BUFFER = 64
OLDER_SECRETS_MAX = 8  # older group keys an advert is tried under, newest first
RESOLVE_QUEUE = 64
RESOLVERS = 2
RESOLVE_TIMEOUT_MS = 3000
REFRESH_S = 15.0
# register_service probes for ~0.75 s and announces for ~1 s; close() sends goodbyes and joins zeroconf's threads.
CALL_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
# Own instance names remembered, so a lingering cached copy of a recent advert of ours is still ignored.
OWN_NAMES_KEPT = 4
# A floor on the refresh sleep, so a clock sitting right on a bucket boundary cannot make the loop spin.
MIN_SLEEP_S = 0.05

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


@attrs.frozen
class Found:
    """A group member on the LAN: the addresses it asked to be dialled at, and the peer id they claim (unproven)."""

    addresses: tuple[str, ...]
    peer_hint: str | None
    stale: bool = False  # its advert opened only under an older group key: it missed a rotation, so it cannot find us


@attrs.frozen
class _Advert:
    tag: str
    info: ServiceInfo


def _random_label() -> str:
    return secrets.token_hex(8)


async def _in_thread(call: Callable[[], _T], timeout_s: float = CALL_TIMEOUT_S) -> _T:
    # Zeroconf's sync API blocks on its own event-loop thread; a call that overruns is abandoned, not awaited.
    try:
        with trio.fail_after(timeout_s):
            return await trio.to_thread.run_sync(call, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise ZeroconfError(f"a zeroconf call took longer than {timeout_s} s") from None
    except (ZeroconfLibraryError, OSError) as error:
        raise ZeroconfError(f"zeroconf failed: {error!r}") from error


async def _cleanup(call: Callable[[], object]) -> None:
    # Shielded so that shutdown still says goodbye after a cancellation, and bounded so that it cannot hang.
    with trio.CancelScope(shield=True):
        try:
            await _in_thread(call, CLOSE_TIMEOUT_S)
        except ZeroconfError as error:
            _log.warning("mDNS shutdown step failed: %s", error)


class MdnsDiscovery:
    """Advertise this node to its group on `interfaces` only, and report the group members found there as `Found`."""

    # Use as `async with MdnsDiscovery(...) as discovery: async for found in discovery: ...`; with advertise=False it
    # only looks (port and addresses are then unused). Instance and host
    # names are random and change with the time bucket and the group secret; the TXT record carries a rotating tag
    # and the sealed `addresses` only (docs/spec/discovery.md). A member may be reported again (a new bucket, an
    # updated record); `dropped` counts events and lookups lost to full buffers (the oldest event goes first), and
    # `ignored` counts adverts that were not this group's.

    def __init__(
        self,
        interfaces: list[str],
        group_secret_provider: Callable[[], bytes],
        port: int,
        addresses: list[str],
        now_s: Callable[[], float] = time.time,
        *,
        bucket_s: int = BUCKET_S,
        refresh_s: float = REFRESH_S,
        buffer_max: int = FOUND_BUFFER,
        older_secrets_provider: Callable[[], Sequence[bytes]] = tuple,
        advertise: bool = True,
    ) -> None:
        if isinstance(interfaces, str) or not interfaces:
            raise DiscoveryError("give a list of at least one interface address to bind mDNS to")
        try:
            self._interfaces = [str(ipaddress.ip_address(interface)) for interface in interfaces]
        except ValueError as error:
            raise DiscoveryError(f"interfaces are IP addresses of local interfaces: {error}") from None
        if advertise:
            if type(port) is not int or not 0 < port < 65536:
                raise DiscoveryError(f"a port is 1 to 65535, got {port!r}")
            check_addresses(addresses)
        self._advertises = advertise
        if not refresh_s > 0 or type(buffer_max) is not int or buffer_max < 1:
            raise DiscoveryError(f"refresh_s and buffer_max are positive, got {refresh_s!r} and {buffer_max!r}")
        time_bucket(0, bucket_s)  # validates bucket_s
        self._secret = group_secret_provider
        self._older_secrets = older_secrets_provider
        self._port = port
        self._addresses = list(addresses)
        self._now_s = now_s
        self._bucket_s = bucket_s
        self._refresh_s = refresh_s
        self.dropped = 0
        self.ignored = 0
        self._found_send, self._found_receive = trio.open_memory_channel[Found](buffer_max)
        # A second handle on the same buffer, used only to discard the oldest event when it is full.
        self._found_oldest = self._found_receive.clone()
        self._resolve_send, self._resolve_receive = trio.open_memory_channel[str](RESOLVE_QUEUE)
        self._pending: set[str] = set()
        self._own_names: collections.deque[str] = collections.deque(maxlen=OWN_NAMES_KEPT)
        self._advert: _Advert | None = None
        self._zeroconf: Zeroconf | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def instance_name(self) -> str | None:
        """The DNS-SD instance name currently advertised, or None between adverts."""
        return self._advert.info.name if self._advert else None

    async def __aenter__(self) -> Self:
        if self._token is not None:
            raise DiscoveryError("an MdnsDiscovery runs once; make a new one")
        self._token = trio.lowlevel.current_trio_token()
        async with contextlib.AsyncExitStack() as stack:
            zeroconf = self._zeroconf = await _in_thread(self._open_zeroconf)
            stack.push_async_callback(_cleanup, zeroconf.close)
            stack.push_async_callback(self._found_send.aclose)
            stack.callback(self._resolve_send.close)
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            for _ in range(RESOLVERS):
                nursery.start_soon(self._resolver)
            # Browse before advertising, so members already on the LAN are found while our own name is probed.
            browser = await _in_thread(lambda: ServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[self._on_state_change]))
            stack.push_async_callback(_cleanup, browser.cancel)
            if self._advertises:
                await self._advertise()
                nursery.start_soon(self._refresh_loop)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        assert self._stack is not None, "__aexit__ without a successful __aenter__"
        try:
            await self._stack.__aexit__(exc_type, exc, traceback)
        except BaseExceptionGroup as group:
            # The caller's block ran inside our nursery, which wrapped its exception: let the original propagate.
            if exc is None or len(group.exceptions) != 1 or group.exceptions[0] is not exc:
                raise

    async def receive(self) -> Found:
        """Wait for the next group member found; raise DiscoveryError once discovery has stopped."""
        try:
            return await self._found_receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise DiscoveryError("mDNS discovery has stopped") from None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Found:
        try:
            return await self.receive()
        except DiscoveryError:
            raise StopAsyncIteration from None

    def _open_zeroconf(self) -> Zeroconf:
        # use_asyncio=False: zeroconf runs its own loop thread rather than looking for an asyncio loop to attach to.
        zeroconf = Zeroconf(interfaces=self._interfaces, use_asyncio=False)
        # Zeroconf only logs an interface it cannot bind, so check that every one of them got a socket.
        if len(zeroconf.engine.senders) != len(self._interfaces):
            zeroconf.close()
            raise ZeroconfError(f"could not bind mDNS to every interface of {self._interfaces}")
        return zeroconf

    def _wanted(self) -> tuple[bytes, int]:
        secret = self._secret()
        check_group_secret(secret)
        return secret, time_bucket(self._now_s(), self._bucket_s)

    async def _advertise(self) -> None:
        zeroconf = self._zeroconf
        assert zeroconf is not None
        secret, bucket = self._wanted()
        txt = build_txt(secret, bucket, self._addresses)
        info = ServiceInfo(
            SERVICE_TYPE,
            f"{_random_label()}.{SERVICE_TYPE}",
            port=self._port,
            properties=txt,
            # An explicit random host name: zeroconf's default reuses the instance name, and the machine's host name
            # is a stable identifier.
            server=f"{_random_label()}.local.",
            parsed_addresses=self._interfaces,
        )
        self._own_names.append(info.name)
        await _in_thread(lambda: zeroconf.register_service(info))
        self._advert = _Advert(txt["tag"], info)
        _log.debug("mDNS advert %s registered for bucket %d", info.name, bucket)

    async def _readvertise(self) -> None:
        zeroconf = self._zeroconf
        assert zeroconf is not None
        if self._advert is not None:
            # Withdrawn before the next advert is made, so an observer never sees the old and new names side by side.
            old, self._advert = self._advert.info, None
            await _in_thread(lambda: zeroconf.unregister_service(old))
        await self._advertise()

    def _seconds_to_next_check(self) -> float:
        until_bucket = self._bucket_s - self._now_s() % self._bucket_s
        return max(min(until_bucket, self._refresh_s), MIN_SLEEP_S)

    async def _refresh_loop(self) -> None:
        # Runs until discovery stops; every pass sleeps at most refresh_s.
        while True:
            await trio.sleep(self._seconds_to_next_check())
            try:
                secret, bucket = self._wanted()
                # The tag changes exactly when the bucket or the group secret does.
                if self._advert is None or self._advert.tag != discovery_tag(secret, bucket):
                    await self._readvertise()
            except DiscoveryError as error:
                # The next pass retries: a transient failure must not end discovery.
                _log.warning("mDNS re-advertising failed: %s", error)

    def _on_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # Runs on zeroconf's browser thread: hand the name to trio and return at once.
        if state_change is ServiceStateChange.Removed or self._token is None:
            return
        # RunFinishedError: the trio run is over, so nobody is listening any more.
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._queue_resolve, name)

    def _queue_resolve(self, name: str) -> None:
        # Runs in trio via run_sync_soon, where an escaping exception would crash the run: catch what send can raise.
        if name in self._own_names or name in self._pending:
            return
        try:
            self._resolve_send.send_nowait(name)
        except trio.WouldBlock:
            self.dropped += 1
            return
        except trio.ClosedResourceError:
            return
        self._pending.add(name)

    async def _resolver(self) -> None:
        zeroconf = self._zeroconf
        assert zeroconf is not None
        # Ends when discovery stops and cancels it; each lookup is bounded by RESOLVE_TIMEOUT_MS.
        async for name in self._resolve_receive:
            # Discarded before resolving, so an update that arrives meanwhile is resolved again.
            self._pending.discard(name)
            try:
                info = await _in_thread(
                    functools.partial(zeroconf.get_service_info, SERVICE_TYPE, name, RESOLVE_TIMEOUT_MS)
                )
                addresses, stale = None, False
                if info is not None:
                    addresses = open_txt(self._secret(), info.properties, self._now_s(), self._bucket_s)
                    # A member that missed a key rotation still advertises under an older key of the group.
                    for older in list(self._older_secrets())[:OLDER_SECRETS_MAX]:
                        if addresses is not None:
                            break
                        addresses = open_txt(older, info.properties, self._now_s(), self._bucket_s)
                        stale = addresses is not None
            except DiscoveryError as error:
                _log.warning("mDNS could not read the advert %s: %s", name, error)
                continue
            if addresses is None:
                self.ignored += 1
                continue
            self._emit(Found(addresses, peer_hint(addresses), stale))

    def _emit(self, found: Found) -> None:
        try:
            self._found_send.send_nowait(found)
        except trio.WouldBlock:
            # Drop the oldest: a fresher advert of the same peer is the more useful one to dial.
            self._found_oldest.receive_nowait()
            self.dropped += 1
            self._found_send.send_nowait(found)
