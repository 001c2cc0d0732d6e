"""Two devices on one home network, with the defaults only: pair by the code alone, converge, and find each other again
after restarts with no mDNS and no address given."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from node.api.rpc import RpcClient
from tests.netns import Lan, lan, unavailable_reason
from tests.processes import PASSPHRASE, env, wait_until

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


def argv(home: Path, *args: str) -> list[str]:
    return ["env", f"AICO_PASSPHRASE={PASSPHRASE}", sys.executable, "-m", "cli", "--home", str(home), *args]


def start(network: Lan, host, home: Path, *args: str) -> tuple[subprocess.Popen, dict]:
    process = network.popen(host, argv(home, "run", "--no-gui", *args))
    line = process.stdout.readline()
    assert line, process.stderr.read()
    return process, json.loads(line)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def call(home: Path, method: str, **params):
    with RpcClient.connect(home / "node.sock", timeout_s=60) as client:
        return client.call(method, **params)


def peers_of(home: Path) -> dict[str, dict]:
    return {peer["name"]: peer for peer in call(home, "status", stores=False)["peers"]}


def test_two_devices_on_the_defaults_pair_by_code_alone_and_find_each_other_again_without_mdns(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    done = subprocess.run(argv(a, "init", "--name", "kitchen"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with lan(2) as network:
        a_host, b_host = network.hosts
        node_a, ready_a = start(network, a_host, a)
        # Every interface on the default port, handed out as the LAN address, never 0.0.0.0.
        assert ready_a["addresses"] == [f"/ip4/{a_host.address}/tcp/4242/p2p/{ready_a['device_id']}"]
        invite = subprocess.Popen(argv(a, "pair", "invite", "--json"), stdout=subprocess.PIPE, text=True, env=env())
        try:
            offer = json.loads(invite.stdout.readline())
            assert offer["addresses"] == ready_a["addresses"]
            join = network.popen(b_host, argv(b, "pair", "join", offer["code"], "--name", "study"))  # no address
            _, stderr = join.communicate(timeout=120)
            assert join.returncode == 0, stderr
        finally:
            invite.terminate()
            invite.wait(timeout=30)
        node_b, _ = start(network, b_host, b)
        call(a, "pref.set", key="theme", value="dark")
        call(b, "msg.add", conversation="home", text="from the study")
        wait_until(lambda: call(a, "digest") == call(b, "digest"), 60, "the two devices to converge")
        assert peers_of(a)["study"]["path"] == peers_of(b)["kitchen"]["path"] == "lan"

        # Restarted with no mDNS and no --peer: each dials the other where it was last seen.
        stop(node_a)
        stop(node_b)
        node_a, _ = start(network, a_host, a, "--no-mdns")
        node_b, _ = start(network, b_host, b, "--no-mdns")
        call(a, "pref.set", key="theme", value="light")
        wait_until(lambda: call(b, "pref.get", key="theme") == "light", 60, "b to hear from a again")
        assert peers_of(b)["kitchen"]["online"] and peers_of(b)["kitchen"]["path"] == "direct"
        assert f"/ip4/{a_host.address}/tcp/4242/p2p/{ready_a['device_id']}" in peers_of(b)["kitchen"]["addresses"]
        stop(node_a)
        stop(node_b)


def test_a_code_no_invite_answers_for_on_the_lan_is_said_plainly_and_leaves_no_home(tmp_path):
    with lan(1) as network:
        join = network.popen(network.hosts[0], argv(tmp_path / "b", "pair", "join", "7K3QX-M2V9T"))
        _, stderr = join.communicate(timeout=60)
    assert join.returncode == 1 and "Traceback" not in stderr
    assert "no invite for this code answers on this network" in stderr and "--address" in stderr
    assert not (tmp_path / "b").exists()
