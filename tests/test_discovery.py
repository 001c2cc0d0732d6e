"""LAN discovery: tags, sealed adverts, and real mDNS between processes in throwaway network namespaces."""

# Run as `python -m tests.test_discovery host|pair ...`, this file is also the program each namespace runs: it prints
# JSON lines on stdout.

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
import trio
from zeroconf import DNSIncoming, DNSText

from discovery import DiscoveryError, Found, MdnsDiscovery, ZeroconfError, discovery_tag, matches, time_bucket
from discovery.advert import CHUNK_CHARS, SEALED_CHUNKS, build_txt, open_txt, peer_hint
from discovery.errors import AdvertTooLargeError
from discovery.tags import BUCKET_S, matching_bucket
from node.trust.identity import DeviceIdentity
from tests.netns import NetnsHost, lan, loopback_host

NOW = 1_700_000_000.0
MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
LIBP2P_PORT = 4001
FIND_WITHIN_S = 10.0
HOST_MIN_S = 6.0
HOST_MAX_S = 14.0
PROCESS_GRACE_S = 20.0


def _props(txt: dict[str, str]) -> dict[bytes, bytes]:
    return {key.encode(): value.encode() for key, value in txt.items()}


def _multiaddr(address: str, device_id: str) -> str:
    return f"/ip4/{address}/tcp/{LIBP2P_PORT}/p2p/{device_id}"


# --- tags -------------------------------------------------------------------------------------------------------


def test_tag_is_equal_for_one_group_and_bucket_and_differs_between_groups():
    group, other = os.urandom(32), os.urandom(32)
    bucket = time_bucket(NOW)
    assert discovery_tag(group, bucket) == discovery_tag(bytes(group), bucket)
    assert discovery_tag(group, bucket) != discovery_tag(other, bucket)
    assert len(discovery_tag(group, bucket)) == 32
    assert matches(group, discovery_tag(group, bucket), NOW)
    assert not matches(other, discovery_tag(group, bucket), NOW)


def test_tag_changes_every_bucket_and_adjacent_buckets_are_accepted():
    group = os.urandom(32)
    bucket = time_bucket(NOW)
    tags = [discovery_tag(group, bucket + delta) for delta in range(-3, 4)]
    assert len(set(tags)) == len(tags)
    for delta, expected in [(-2, False), (-1, True), (0, True), (1, True), (2, False)]:
        assert matches(group, discovery_tag(group, bucket + delta), NOW) is expected
    assert matching_bucket(group, discovery_tag(group, bucket + 1), NOW) == bucket + 1
    # Near a boundary a few seconds of skew put the sender in the next bucket, which is still accepted.
    boundary = (bucket + 1) * BUCKET_S
    assert matches(group, discovery_tag(group, time_bucket(boundary + 5)), boundary - 5)


def test_tag_holds_no_secret_or_device_id_and_is_unlinkable_across_buckets():
    group = os.urandom(32)
    device_id = DeviceIdentity(os.urandom(32)).device_id
    bucket = time_bucket(NOW)
    tag, next_tag = discovery_tag(group, bucket), discovery_tag(group, bucket + 1)
    for window in range(len(group) - 3):
        assert group[window : window + 4].hex() not in tag
    assert device_id not in tag and device_id[:8] not in tag
    # Unlinkable: consecutive tags share no more hex digits in place than unrelated random strings would (~2 of 32).
    assert sum(a == b for a, b in zip(tag, next_tag, strict=True)) < 10
    assert not any(matches(os.urandom(32), tag, NOW) for _ in range(50))


def test_tags_reject_malformed_input():
    with pytest.raises(DiscoveryError):
        discovery_tag(b"short", 1)
    with pytest.raises(DiscoveryError):
        discovery_tag(os.urandom(32), -1)
    with pytest.raises(DiscoveryError):
        time_bucket(NOW, 0)
    assert not matches(os.urandom(32), "not-a-tag", NOW)
    assert not matches(os.urandom(32), "Ä" * 32, NOW)


# --- sealed adverts ---------------------------------------------------------------------------------------------


def test_advert_seals_the_addresses_for_the_group_only():
    group = os.urandom(32)
    device_id = DeviceIdentity(os.urandom(32)).device_id
    addresses = [_multiaddr("10.1.2.3", device_id), "10.1.2.3:4001"]
    txt = build_txt(group, time_bucket(NOW), addresses)
    assert set(txt) == {"v", "tag"} | {f"addrs{i}" for i in range(SEALED_CHUNKS)}
    assert all(len(f"{key}={value}") <= 255 for key, value in txt.items())
    flat = json.dumps(txt)
    assert device_id not in flat and "/p2p/" not in flat and "10.1.2.3" not in flat
    assert open_txt(group, _props(txt), NOW) == tuple(addresses)
    assert open_txt(os.urandom(32), _props(txt), NOW) is None
    assert open_txt(group, _props(txt), NOW + 3 * BUCKET_S) is None
    assert peer_hint(addresses) == device_id


def test_advert_length_does_not_depend_on_the_addresses():
    group = os.urandom(32)
    short = build_txt(group, 1, ["10.0.0.1:1"])
    long = build_txt(group, 1, [_multiaddr(f"10.0.0.{i}", DeviceIdentity(os.urandom(32)).device_id) for i in range(3)])
    assert {k: len(v) for k, v in short.items()} == {k: len(v) for k, v in long.items()}
    with pytest.raises(AdvertTooLargeError):
        build_txt(group, 1, ["x" * 190] * 3)


def test_tampered_or_rebound_adverts_are_rejected():
    group = os.urandom(32)
    bucket = time_bucket(NOW)
    txt = build_txt(group, bucket, ["10.0.0.1:4001"])
    flipped = dict(txt, addrs0=("A" if txt["addrs0"][0] != "A" else "B") + txt["addrs0"][1:])
    assert open_txt(group, _props(flipped), NOW) is None
    # A box sealed for one bucket under the tag of the next one: the bucket inside the box must match the tag.
    rebound = dict(txt, tag=discovery_tag(group, bucket + 1))
    assert open_txt(group, _props(rebound), NOW) is None
    assert open_txt(group, _props(dict(txt, v="2")), NOW) is None
    assert open_txt(group, {key: value for key, value in _props(txt).items() if key != b"addrs1"}, NOW) is None
    assert open_txt(group, {b"v": None, b"tag": b"\xff"}, NOW) is None
    assert CHUNK_CHARS < 250


@pytest.mark.parametrize(
    ("interfaces", "port", "addresses"),
    [([], 1, ["a"]), (["eth0"], 1, ["a"]), (["127.0.0.1"], 0, ["a"]), (["127.0.0.1"], 1, []), (["127.0.0.1"], 1, "a")],
)
def test_discovery_rejects_bad_arguments_before_touching_the_network(interfaces, port, addresses):
    with pytest.raises(DiscoveryError):
        MdnsDiscovery(interfaces, lambda: os.urandom(32), port, addresses)


# --- real mDNS in network namespaces ----------------------------------------------------------------------------


def _read_lines(process: subprocess.Popen[str], timeout_s: float) -> list[dict]:
    stdout, stderr = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, stderr
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _host_args(host: NetnsHost, secret: bytes, address: str, expect: int, sniff: bool = False) -> list[str]:
    args = ["host", "--interface", host.address, "--secret", secret.hex(), "--address", address]
    args += ["--expect", str(expect), "--min-s", str(HOST_MIN_S), "--max-s", str(HOST_MAX_S)]
    return args + (["--sniff"] if sniff else [])


def test_group_members_find_each_other_and_an_outsider_learns_nothing():
    group, outsider_group = os.urandom(32), os.urandom(32)
    with lan(4) as network:
        members, outsider = network.hosts[:3], network.hosts[3]
        device_ids = [DeviceIdentity(os.urandom(32)).device_id for _ in network.hosts]
        addresses = [
            _multiaddr(host.address, device_id) for host, device_id in zip(network.hosts, device_ids, strict=True)
        ]
        arguments = [_host_args(host, group, addresses[i], expect=2) for i, host in enumerate(members)]
        arguments.append(_host_args(outsider, outsider_group, addresses[3], expect=0, sniff=True))
        processes = [
            network.python(host, "tests.test_discovery", *args)
            for host, args in zip(network.hosts, arguments, strict=True)
        ]
        outputs = [_read_lines(process, HOST_MAX_S + PROCESS_GRACE_S) for process in processes]

    for index, lines in enumerate(outputs[:3]):
        found = {tuple(line["addresses"]): line for line in lines if line["event"] == "found"}
        others = {(addresses[j],) for j in range(3) if j != index}
        assert set(found) == others, f"member {index} found {sorted(found)}"
        assert all(found[key]["t"] <= FIND_WITHIN_S for key in others), lines
        assert {found[key]["peer_hint"] for key in others} == {device_ids[j] for j in range(3) if j != index}

    outsider_lines = outputs[3]
    assert not [line for line in outsider_lines if line["event"] == "found"]
    member_packets = [
        bytes.fromhex(line["hex"])
        for line in outsider_lines
        if line["event"] == "packet" and line["source"] in {host.address for host in members}
    ]
    assert member_packets, "the outsider captured no mDNS packet from the group"
    forbidden = [text.encode() for text in [*device_ids[:3], *addresses[:3], "/p2p/", group.hex()]]
    # The machine's host name as a DNS label (length byte first): a short name also occurs by chance in base64 text.
    hostname = socket.gethostname().split(".")[0].encode()
    forbidden.append(bytes([len(hostname)]) + hostname)
    for packet in member_packets:
        for text in forbidden:
            assert text not in packet, f"{text!r} appears in an mDNS packet on the LAN"
    adverts = [line for line in outsider_lines if line["event"] == "txt" and line["source"] != outsider.address]
    assert adverts, "the outsider captured no TXT record of the group"
    for advert in adverts:
        keys = {item.split("=", 1)[0] for item in advert["strings"]}
        assert keys == {"v", "tag"} | {f"addrs{i}" for i in range(SEALED_CHUNKS)}, advert


def test_loopback_smoke_finds_a_peer_and_readvertises_on_new_bucket_or_secret():
    with loopback_host() as network:
        process = network.python(network.hosts[0], "tests.test_discovery", "pair")
        lines = _read_lines(process, 40)
    result = lines[-1]
    assert result["event"] == "pair", lines
    assert result["a_found"] == ["127.0.0.1:2"] and result["b_found_first"] == ["127.0.0.1:1"]
    # A new bucket and then a new group secret each give a new random instance name, and the peer finds it again.
    assert len(set(result["a_names"])) == 3
    assert result["b_refound_after"] == ["bucket", "secret"]
    # An exception in the caller's block comes out as itself, not wrapped in an exception group.
    assert result["body_error"] == "LookupError"
    # An address that is on no interface of the namespace: zeroconf only logs it, discovery raises.
    assert result["unbindable"] == "ZeroconfError"


def test_a_member_that_missed_a_key_rotation_is_still_found_and_marked_stale():
    with loopback_host() as network:
        process = network.python(network.hosts[0], "tests.test_discovery", "stale")
        lines = _read_lines(process, 40)
    assert lines[-1] == {"event": "stale", "found": ["127.0.0.1:2"], "stale": True}, lines


@pytest.mark.trio
async def test_a_full_event_buffer_drops_the_oldest_event_and_counts_it():
    discovery = MdnsDiscovery(["127.0.0.1"], lambda: os.urandom(32), 1, ["127.0.0.1:1"], buffer_max=2)
    for port in range(1, 4):
        discovery._emit(Found((f"10.0.0.1:{port}",), None))
    assert discovery.dropped == 1
    assert [(await discovery.receive()).addresses for _ in range(2)] == [("10.0.0.1:2",), ("10.0.0.1:3",)]


# --- the programs run inside namespaces -------------------------------------------------------------------------


def _emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _txt_strings(rdata: bytes) -> list[str]:
    strings, offset = [], 0
    while offset < len(rdata):
        length = rdata[offset]
        strings.append(rdata[offset + 1 : offset + 1 + length].decode("utf-8", "replace"))
        offset += 1 + length
    return strings


async def _sniff(interface: str, started: float) -> None:
    """Print every mDNS packet heard on `interface`, and the TXT records in it, until cancelled."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    await sock.bind(("", MDNS_PORT))
    membership = struct.pack("4s4s", socket.inet_aton(MDNS_GROUP), socket.inet_aton(interface))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    with sock:
        while True:  # ends when the host's deadline cancels it
            data, (source, _port) = await sock.recvfrom(9000)
            _emit(event="packet", source=source, t=time.monotonic() - started, hex=data.hex())
            for record in DNSIncoming(data).answers():
                if isinstance(record, DNSText):
                    _emit(event="txt", source=source, name=record.name, strings=_txt_strings(record.text))


async def _host(args: argparse.Namespace) -> None:
    """Advertise with one group secret, print what is found, and stop after min-s once `expect` peers were found."""
    started = time.monotonic()
    secret = bytes.fromhex(args.secret)
    async with trio.open_nursery() as nursery:
        if args.sniff:
            nursery.start_soon(_sniff, args.interface, started)
        async with MdnsDiscovery([args.interface], lambda: secret, LIBP2P_PORT, args.address) as discovery:
            _emit(event="ready", t=time.monotonic() - started)
            enough = trio.Event()
            seen: set[tuple[str, ...]] = set()

            async def report() -> None:
                async for found in discovery:
                    if found.addresses not in seen:
                        seen.add(found.addresses)
                        _emit(
                            event="found", addresses=found.addresses, peer_hint=found.peer_hint,
                            t=time.monotonic() - started,
                        )  # fmt: skip
                    if len(seen) >= args.expect:
                        enough.set()

            with trio.move_on_after(args.max_s):
                async with trio.open_nursery() as readers:
                    readers.start_soon(report)
                    if args.expect == 0:
                        enough.set()
                    await enough.wait()
                    await trio.sleep(max(args.min_s - (time.monotonic() - started), 0))
                    readers.cancel_scope.cancel()
            _emit(event="done", dropped=discovery.dropped, ignored=discovery.ignored)
        nursery.cancel_scope.cancel()


async def _next_found(discovery: MdnsDiscovery, timeout_s: float = 8.0) -> list[str]:
    with trio.fail_after(timeout_s):
        return list((await discovery.receive()).addresses)


async def _pair() -> None:
    """Two instances on 127.0.0.1 find each other, then follow the other through a bucket change and a new secret."""
    clock = [NOW]
    secret = [os.urandom(32)]

    def now() -> float:
        return clock[0]

    def provider() -> bytes:
        return secret[0]

    options = {"now_s": now, "refresh_s": 0.2}
    a_names: list[str | None] = []
    refound = []
    body_error = ""
    try:
        async with (
            MdnsDiscovery(["127.0.0.1"], provider, 1, ["127.0.0.1:1"], **options) as a,
            MdnsDiscovery(["127.0.0.1"], provider, 2, ["127.0.0.1:2"], **options) as b,
        ):
            a_names.append(a.instance_name)
            a_found, b_found_first = await _next_found(a), await _next_found(b)
            for change in ("bucket", "secret"):
                if change == "bucket":
                    clock[0] += BUCKET_S
                else:
                    secret[0] = os.urandom(32)
                # A's old advert leaves with a goodbye, which reports nothing, so B's next event is A's new advert.
                if await _next_found(b) == ["127.0.0.1:1"]:
                    refound.append(change)
                with trio.fail_after(8):
                    # B may hear the new advert's announcement before A's register call has returned.
                    while a.instance_name is None or a.instance_name in a_names:
                        await trio.sleep(0.05)
                a_names.append(a.instance_name)
            raise LookupError("an error in the caller's block")
    except LookupError:
        body_error = "LookupError"
    unbindable = ""
    try:
        async with MdnsDiscovery(["10.255.255.1"], provider, 1, ["10.255.255.1:1"]):
            pass
    except ZeroconfError as error:
        unbindable = type(error).__name__
    _emit(
        event="pair", a_found=a_found, b_found_first=b_found_first, a_names=a_names, b_refound_after=refound,
        body_error=body_error, unbindable=unbindable,
    )  # fmt: skip


async def _stale() -> None:
    """A holds a rotated key and the older one; B missed the rotation and still advertises under the older key."""
    older, rotated = os.urandom(32), os.urandom(32)
    options = {"now_s": lambda: NOW, "refresh_s": 0.2}
    async with (
        MdnsDiscovery(["127.0.0.1"], lambda: rotated, 1, ["127.0.0.1:1"], older_secrets_provider=lambda: [older], **options) as a,
        MdnsDiscovery(["127.0.0.1"], lambda: older, 2, ["127.0.0.1:2"], **options),
    ):
        with trio.fail_after(20):
            found = await a.receive()
    _emit(event="stale", found=list(found.addresses), stale=found.stale)


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.test_discovery")
    commands = parser.add_subparsers(dest="command", required=True)
    host = commands.add_parser("host")
    host.add_argument("--interface", required=True)
    host.add_argument("--secret", required=True)
    host.add_argument("--address", action="append", required=True)
    host.add_argument("--expect", type=int, required=True)
    host.add_argument("--min-s", type=float, required=True)
    host.add_argument("--max-s", type=float, required=True)
    host.add_argument("--sniff", action="store_true")
    commands.add_parser("pair")
    commands.add_parser("stale")
    args = parser.parse_args(argv)
    if args.command == "host":
        trio.run(_host, args)
    elif args.command == "stale":
        trio.run(_stale)
    else:
        trio.run(_pair)


if __name__ == "__main__":
    _main(sys.argv[1:])
