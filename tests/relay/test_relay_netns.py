"""Network namespaces, real processes: devices A and B on two networks with no route between them, both reaching
an `aico-node relay` R, pair through R, converge, and exchange live changes both ways; R's capture holds none of
what they wrote."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import unavailable_reason
from tests.processes import wait_until
from tests.relay.test_circuit_netns import PEER_MODULE, RELAY_PORT, read_json_line, two_networks_joined_by_a_relay
from tests.test_lan_sync import PASSPHRASE, _env, _node_argv
from tests.test_lan_sync import _call as call

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
NODE_PORT = 4100


def node(network, host, home: Path, *args: str) -> subprocess.Popen:
    return network.popen(host, ["env", f"AICO_PASSPHRASE={PASSPHRASE}", *_node_argv(home, *args)])


def test_devices_with_no_route_pair_and_sync_through_the_relay_which_sees_no_plaintext(tmp_path):
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    done = subprocess.run(_node_argv(a_home, "init"), capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    capture_file = tmp_path / "relay.capture"
    with two_networks_joined_by_a_relay() as (network, a, b, r_net1, r_net2):
        capture = network.python(r_net1, PEER_MODULE, "capture", str(capture_file))
        assert read_json_line(capture) == {"capturing": True}
        legs = [f"/ip4/{leg.address}/tcp/{RELAY_PORT}" for leg in (r_net1, r_net2)]
        relay = network.popen(
            r_net1, [sys.executable, "-m", "cli", "relay", "--listen", legs[0], "--listen", legs[1], "--data", str(tmp_path / "r")]
        )  # fmt: skip
        relay_addrs = read_json_line(relay)["addresses"]
        relay_for = {host: next(x for x in relay_addrs if f"/ip4/{leg.address}/" in x) for host, leg in ((a, r_net1), (b, r_net2))}

        listen_a = f"/ip4/{a.address}/tcp/{NODE_PORT}"
        a_node = node(network, a, a_home, "run", "--listen", listen_a, "--no-mdns", "--relay", relay_for[a])
        a_ready = read_json_line(a_node)
        wait_until(lambda: call(a_home, "status")["relay"]["circuit_address"], 30, "a to hold a slot on the relay")
        a_through_relay = f"{relay_for[b]}/p2p-circuit/p2p/{a_ready['device_id']}"

        invite = node(network, a, a_home, "pair", "invite", "--json")
        offer = read_json_line(invite)
        assert any("/p2p-circuit/" in address for address in offer["addresses"])  # the invite names the relayed path
        listen_b = f"/ip4/{b.address}/tcp/{NODE_PORT}"
        join = node(network, b, b_home, "pair", "join", offer["code"], "--address", a_through_relay, "--listen", listen_b)
        _, stderr = join.communicate(timeout=120)
        assert join.returncode == 0, stderr
        invite.kill()

        b_node = node(network, b, b_home, "run", "--listen", listen_b, "--no-mdns", "--relay", relay_for[b])
        b_ready = read_json_line(b_node)
        call(a_home, "pref.set", key="theme", value="PLAINTEXT-THEME-FROM-A")
        call(b_home, "msg.add", conversation="relay", text="PLAINTEXT-MESSAGE-FROM-B")

        def converged() -> bool:
            return call(a_home, "digest") == call(b_home, "digest")

        wait_until(converged, 90, "a and b to converge through the relay")
        peers_a = {p["device_id"]: p for p in call(a_home, "status")["peers"]}
        wait_until(lambda: call(a_home, "status")["peers"][0]["online"], 30, "a live session")
        assert {p["path"] for p in call(a_home, "status")["peers"] if p["online"]} == {"relayed"}
        # Live changes flow both ways over the relayed session.
        for i in range(3):
            call(a_home, "pref.set", key="live", value=f"PLAINTEXT-LIVE-A-{i}")
            wait_until(lambda i=i: call(b_home, "pref.get", key="live") == f"PLAINTEXT-LIVE-A-{i}", 30, "a's change on b")
            call(b_home, "pref.set", key="live", value=f"PLAINTEXT-LIVE-B-{i}")
            wait_until(lambda i=i: call(a_home, "pref.get", key="live") == f"PLAINTEXT-LIVE-B-{i}", 30, "b's change on a")
        assert peers_a[b_ready["device_id"]]["device_id"] == b_ready["device_id"]
        capture.terminate()  # it writes what it already received, then says it stopped
        assert read_json_line(capture) == {"stopped": True}
        capture.wait(timeout=10)
        captured = capture_file.read_bytes()
    assert b"/noise" in captured and len(captured) > 10_000  # the capture saw the connections
    assert b"PLAINTEXT" not in captured
