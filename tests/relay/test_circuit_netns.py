"""Network namespaces: A and B on separate networks with no route between them, both reaching relay R, trade data
through R, and a capture on R holds none of it in plaintext."""

import contextlib
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import Lan, NetnsHost, _add_namespace, _ip, _namespaces, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
PEER_MODULE = "tests.relay.circuit_netns_peer"
RELAY_PORT = 4001
LINE_TIMEOUT_S = 30.0


@contextlib.contextmanager
def two_networks_joined_by_a_relay() -> Iterator[tuple[Lan, NetnsHost, NetnsHost, NetnsHost, NetnsHost]]:
    """A on net1, B on net2, R with a leg in each and no forwarding: yield the network, A, B, R on net1, R on net2."""
    with _namespaces() as (stack, prefix):
        subnet = secrets.randbelow(256)
        names = {role: f"{prefix}-{role}" for role in ("a", "b", "r")}
        for namespace in names.values():
            _add_namespace(stack, namespace)
        hosts = {}
        for leg, (device, network) in enumerate((("a", f"10.124.{subnet}"), ("b", f"10.125.{subnet}"))):
            # Each veth pair is created with both ends directly inside our namespaces, never in the root one.
            veth = ["eth0", "type", "veth", "peer", "name", f"leg{leg}", "netns", names["r"]]
            _ip("-n", names[device], "link", "add", *veth)
            _ip("-n", names[device], "addr", "add", f"{network}.1/24", "dev", "eth0")
            _ip("-n", names[device], "link", "set", "eth0", "up")
            _ip("-n", names["r"], "addr", "add", f"{network}.2/24", "dev", f"leg{leg}")
            _ip("-n", names["r"], "link", "set", f"leg{leg}", "up")
            hosts[device] = NetnsHost(names[device], f"{network}.1")
            hosts[f"r{leg}"] = NetnsHost(names["r"], f"{network}.2")
        network = Lan([hosts["a"], hosts["b"], hosts["r0"]])
        stack.callback(network.stop_processes)
        yield network, hosts["a"], hosts["b"], hosts["r0"], hosts["r1"]


def read_json_line(process: subprocess.Popen[str]) -> dict:
    """The next JSON line `process` prints, within a bound (a dead process fails the test with its stderr)."""
    deadline = time.monotonic() + LINE_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("{"):
            return json.loads(line)
        if not line and process.poll() is not None:
            raise AssertionError(f"{process.args} exited: {process.stderr.read()}")
    raise AssertionError(f"{process.args} printed nothing for {LINE_TIMEOUT_S} s")


def test_devices_with_no_route_between_them_talk_through_the_relay_which_sees_no_plaintext(tmp_path: Path):
    marker_a = f"AICO-PLAINTEXT-MARKER-A-{secrets.token_hex(8)}"
    marker_b = f"AICO-PLAINTEXT-MARKER-B-{secrets.token_hex(8)}"
    capture_file = tmp_path / "relay.capture"
    with two_networks_joined_by_a_relay() as (network, a, b, r_net1, r_net2):
        capture = network.python(r_net1, PEER_MODULE, "capture", str(capture_file))
        assert read_json_line(capture) == {"capturing": True}
        legs = {"net1": r_net1.address, "net2": r_net2.address}
        relay = network.python(r_net1, PEER_MODULE, "relay", *(f"/ip4/{ip}/tcp/{RELAY_PORT}" for ip in legs.values()))
        relay_addrs = read_json_line(relay)["addresses"]
        relay_on = {net: next(addr for addr in relay_addrs if f"/ip4/{ip}/" in addr) for net, ip in legs.items()}

        listener = network.python(b, PEER_MODULE, "listen", f"/ip4/{b.address}/tcp/4002", relay_on["net2"], marker_b)
        b_ready = read_json_line(listener)
        # A reaches B through R's leg on A's own network.
        circuit_for_a = b_ready["circuit_address"].replace(relay_on["net2"], relay_on["net1"])
        dialler = network.python(
            a, PEER_MODULE, "dial", f"/ip4/{a.address}/tcp/4003", b_ready["addresses"][0], circuit_for_a, marker_a
        )
        a_done = read_json_line(dialler)
        b_heard = read_json_line(listener)
        capture.terminate()  # it writes what it already received, then says it stopped
        assert read_json_line(capture) == {"stopped": True}
        capture.wait(timeout=10)
        captured = capture_file.read_bytes()

    assert a_done["direct_error"] and "cannot dial" in a_done["direct_error"]  # no route from A to B
    assert a_done["path"] == "relayed" and a_done["answer"] == marker_b
    assert b_heard == {"heard": marker_a, "from_peer": a_done["peer_id"]}  # Noise end to end: B sees A's own id
    # The capture saw the connections' cleartext preamble, so it would have seen a plaintext marker too.
    assert b"/noise" in captured and len(captured) > 10_000
    assert marker_a.encode() not in captured and marker_b.encode() not in captured
