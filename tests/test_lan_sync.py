"""Network namespaces: devices on one LAN find each other by mDNS alone, pair, converge; a stranger gets nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.api.rpc import RpcClient
from tests.netns import Lan, lan, unavailable_reason
from tests.processes import wait_until

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
PASSPHRASE = "lan test passphrase"


def _env() -> dict:
    return {**os.environ, "AICO_PASSPHRASE": PASSPHRASE}


def _node_argv(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cli", "--home", str(home), *args]


def _start(network: Lan, host, home: Path) -> dict:
    process = network.popen(host, ["env", f"AICO_PASSPHRASE={PASSPHRASE}", *_node_argv(home, "run", "--listen", f"/ip4/{host.address}/tcp/0")])
    line = process.stdout.readline()
    assert line, process.stderr.read()
    return json.loads(line)


def _call(home: Path, method: str, **params):
    with RpcClient.connect(home / "node.sock", timeout_s=60) as client:
        return client.call(method, **params)


def _pair(network: Lan, inviter_home: Path, inviter_address: str, host, joiner_home: Path) -> None:
    invite = subprocess.Popen(_node_argv(inviter_home, "pair", "invite", "--json"), stdout=subprocess.PIPE, text=True, env=_env())
    try:
        code = json.loads(invite.stdout.readline())["code"]
        join = network.popen(host, ["env", f"AICO_PASSPHRASE={PASSPHRASE}", *_node_argv(
            joiner_home, "pair", "join", code, "--address", inviter_address, "--listen", f"/ip4/{host.address}/tcp/0"
        )])  # fmt: skip
        _, stderr = join.communicate(timeout=120)
        assert join.returncode == 0, stderr
    finally:
        invite.terminate()
        invite.wait(timeout=30)


def test_three_hosts_find_each_other_by_mdns_pair_and_converge_and_a_stranger_is_ignored(tmp_path):
    homes = [tmp_path / name for name in ("a", "b", "c", "stranger")]
    for home in (homes[0], homes[3]):
        done = subprocess.run(_node_argv(home, "init"), capture_output=True, text=True, env=_env(), timeout=120)
        assert done.returncode == 0, done.stderr
    with lan(4) as network:
        a_host, b_host, c_host, stranger_host = network.hosts
        ready_a = _start(network, a_host, homes[0])
        _call(homes[0], "pref.set", key="theme", value="dark")
        for host, home in ((b_host, homes[1]), (c_host, homes[2])):
            _pair(network, homes[0], ready_a["addresses"][0], host, home)
        # From here on no device is told any address: mDNS alone brings them together.
        ready_b, ready_c = _start(network, b_host, homes[1]), _start(network, c_host, homes[2])
        stranger = _start(network, stranger_host, homes[3])
        for index, home in enumerate(homes[:3]):
            _call(home, "msg.add", conversation="lan", text=f"from device {index}")
            _call(home, "pref.set", key=f"device-{index}", value=index)

        def converged() -> bool:
            return len({json.dumps(_call(home, "digest"), sort_keys=True) for home in homes[:3]}) == 1

        wait_until(converged, 60, "the three devices to converge over mDNS")
        assert _call(homes[1], "digest")["counts"]["messages"] == 3
        # b and c were only ever given a's address for pairing, yet they also sync with each other directly.
        peers_b = {p["device_id"]: p for p in _call(homes[1], "status")["peers"]}
        assert peers_b[ready_c["device_id"]]["online"] and peers_b[ready_a["device_id"]]["online"]
        peers_a = {p["device_id"]: p for p in _call(homes[0], "status")["peers"]}
        assert peers_a[ready_b["device_id"]]["path"] == peers_a[ready_c["device_id"]]["path"] == "lan"
        # The stranger (another group) is never accepted and never receives anything.
        assert _call(homes[3], "pref.get", key="theme") is None
        assert all(not p["online"] for p in _call(homes[3], "status")["peers"])
        for home in homes[:3]:
            assert stranger["device_id"] not in {p["device_id"] for p in _call(home, "status")["peers"]}
