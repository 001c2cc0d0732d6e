"""The relay's mailbox with real processes on loopback: devices that are never online together converge, and
the relay stores nothing readable."""

import json
import os
import signal
import subprocess
import sys

import pytest

from node.trust.identity import DeviceIdentity
from simulations.nats_cluster import free_port
from tests.netns import unavailable_reason
from tests.processes import RunningNode, cli, converged, in_netns, pair, wait_until
from tests.relay.test_circuit_netns import RELAY_PORT, two_networks_joined_by_a_relay


class RunningRelay:
    """An `aico-node relay` process (on loopback unless `listen` and `netns` say where); its mailbox in its folder, or
    on JetStream at `mailbox_store`."""

    def __init__(
        self, data_dir, listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",), mailbox_store: str | None = None,
        netns: str | None = None,
    ) -> None:  # fmt: skip
        command = [*in_netns(netns), sys.executable, "-m", "cli", "relay", "--data", str(data_dir)]
        for address in listen:
            command += ["--listen", address]
        if mailbox_store:
            command += ["--mailbox-store", mailbox_store]
        self.data_dir = data_dir
        # Its log goes to a file beside its folder, so a relay that dies can say why.
        self.log = data_dir.parent / f"{data_dir.name}.log"
        with self.log.open("a") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.process.stdout.readline()
        assert line, self.log.read_text()
        self.addresses = json.loads(line)["addresses"]
        self.address = self.addresses[0]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=30)


@pytest.fixture
def relay(tmp_path):
    running = RunningRelay(tmp_path / "relay")
    yield running
    running.stop()


def test_offline_to_offline_devices_converge_through_the_mailbox_alone(relay, tmp_path):
    assert cli(tmp_path / "a", "init").returncode == 0
    a = RunningNode(tmp_path / "a", relay=relay.address)
    try:
        assert pair(a, tmp_path / "b").returncode == 0
        b = RunningNode(tmp_path / "b", a.address, relay=relay.address)
        wait_until(lambda: converged(a, b), what="the first convergence")
        b.stop()
        a.call("pref.set", key="theme", value="written while b was away")
        for i in range(50):
            a.call("msg.add", conversation="away", text=f"secret message {i}")
        wait_until(lambda: a.call("status")["relay"]["posted_seq"] >= 52, what="a to post its ops")
    finally:
        a.stop()
    # b comes back with no way to reach a: only the relay.
    b = RunningNode(tmp_path / "b", relay=relay.address)
    try:
        wait_until(lambda: b.call("pref.get", key="theme") == "written while b was away", 60, "b to drain the mailbox")
        wait_until(lambda: b.call("status")["stores"]["messages"] == 50, what="every message")
        peers = {p["device_id"]: p for p in b.call("status")["peers"]}
        assert peers[a.device_id]["path"] == "mailbox" and not peers[a.device_id]["online"]
        assert b.call("status")["relay"]["last_error"] is None
    finally:
        b.stop()
    relay.stop()
    stored = b"".join(path.read_bytes() for path in relay.data_dir.rglob("*") if path.is_file())
    assert b"secret message" not in stored and b"written while b was away" not in stored


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_a_relay_restarted_mid_transfer_loses_nothing_and_applies_nothing_twice(tmp_path):
    assert cli(tmp_path / "a", "init").returncode == 0
    a = RunningNode(tmp_path / "a")
    try:
        assert pair(a, tmp_path / "b").returncode == 0
    finally:
        a.stop()
    # Moved to two networks with no route between them: the relay is their only way, live (circuit) and stored.
    with two_networks_joined_by_a_relay() as (_, a_host, b_host, r_net1, r_net2):
        legs = tuple(f"/ip4/{leg.address}/tcp/{RELAY_PORT}" for leg in (r_net1, r_net2))

        def start_relay() -> RunningRelay:
            return RunningRelay(tmp_path / "relay", listen=legs, netns=r_net1.namespace)

        def start_node(name: str, host, leg) -> RunningNode:
            relay_leg = next(address for address in relay.addresses if f"/ip4/{leg.address}/" in address)
            return RunningNode(
                tmp_path / name, relay=relay_leg, listen=f"/ip4/{host.address}/tcp/0", netns=host.namespace
            )

        relay = start_relay()
        a, b = start_node("a", a_host, r_net1), start_node("b", b_host, r_net2)
        try:
            wait_until(lambda: converged(a, b), 60, "the first convergence through the relay")
            wait_until(lambda: [p["path"] for p in b.call("status")["peers"]] == ["relayed"], 30, "a relayed session")
            for i in range(400):
                a.call("msg.add", conversation="restart", text=f"message {i}")
                if i == 200:
                    relay.process.send_signal(signal.SIGKILL)
                    relay.process.wait(timeout=30)
                    relay = start_relay()
            wait_until(lambda: converged(a, b), 120, "convergence after the relay's restart")
            # The digest is of the replica, which runs ahead of the store by the write in flight.
            wait_until(lambda: b.call("status")["stores"]["messages"] == 400, 30, "all 400 messages stored, none twice")
        finally:
            for node in (a, b):
                node.stop()
            relay.stop()


def test_a_node_given_several_relays_moves_to_the_next_when_one_cannot_be_reached(relay, tmp_path):
    unreachable = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{DeviceIdentity(os.urandom(32)).device_id}"
    assert cli(tmp_path / "a", "init").returncode == 0
    a = RunningNode(tmp_path / "a", relay=[unreachable, relay.address])
    b = None
    try:
        wait_until(lambda: (a.call("status")["relay"] or {}).get("circuit_address"), 60, "a to hold a slot on relay 2")
        assert a.call("status")["relay"]["circuit_address"].startswith(relay.address)
        assert pair(a, tmp_path / "b").returncode == 0
        b = RunningNode(tmp_path / "b", relay=relay.address)  # no address of a: relay 2 is its only way
        a.call("pref.set", key="theme", value="through the second relay")
        wait_until(lambda: converged(a, b), 60, "a and b to converge through the relay a moved to")
    finally:
        for node in (a, b):
            if node is not None:
                node.stop()
