"""Revocation with real node processes on loopback: the revoked device is cut off, its later writes count
nowhere, and the devices that stay get the new group key, also one that was offline at the time (from the
relay's mailbox)."""

from pathlib import Path

import msgpack
import nacl.secret
import pytest

from node.identity import load_group_keys, unlock_identity
from node.keyring import KeyRing
from tests.test_mailbox_processes import RunningRelay
from tests.test_sync_processes import PASSPHRASE, RunningNode, cli, converged, pair, wait_until


@pytest.fixture
def relay(tmp_path):
    running = RunningRelay(tmp_path / "relay")
    yield running
    running.stop()


@pytest.fixture
def group(tmp_path, relay):
    """Devices a (first), c and d, paired, converged, all using one relay."""
    assert cli(tmp_path / "a", "init").returncode == 0
    a = RunningNode(tmp_path / "a", relay=relay.address)
    nodes = [a]
    try:
        for name in ("c", "d"):
            done = pair(a, tmp_path / name)
            assert done.returncode == 0, done.stderr
            nodes.append(RunningNode(tmp_path / name, a.address, relay=relay.address))
        a.call("pref.set", key="theme", value="light")
        wait_until(lambda: converged(*nodes), what="the first convergence")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def test_revoked_device_is_cut_off_and_an_offline_device_gets_the_new_key_from_the_mailbox(group, relay, tmp_path):
    a, c, d = group
    d.stop()
    revoked = a.call("devices.revoke", device=c.device_id, reason="lost phone")
    assert revoked == {"revoked": c.device_id, "epoch": 1, "key_sent_to": [d.device_id]}
    assert a.call("status")["group_epoch"] == 1
    wait_until(lambda: not any(p["online"] for p in a.call("status")["peers"]), what="a to drop c")
    a.call("pref.set", key="after", value="written after the revocation")
    c.call("pref.set", key="theme", value="stolen")  # stamped after its revocation
    # d returns, can reach only c and the relay, and hears of the revocation from the mailbox alone: it must
    # take the new key from there, and undo c's write if it took it first.
    d = RunningNode(tmp_path / "d", c.address, relay=relay.address)
    group[2] = d
    wait_until(lambda: d.call("status")["group_epoch"] == 1, 60, what="d to adopt the new group key")
    wait_until(lambda: converged(a, d), 60, what="a and d to converge")
    assert d.call("pref.get", key="theme") == "light"
    assert d.call("pref.get", key="after") == "written after the revocation"
    assert a.call("pref.get", key="theme") == "light"
    assert {row["device"]: row["revoked"] for row in d.call("devices.list")}[c.device_id] is True
    # c can read nothing sealed from now on: it holds no key of the new epoch.
    assert c.call("status")["group_epoch"] == 0
    c.stop()
    a_key = KeyRing(a.home, unlock_identity(a.home, PASSPHRASE)).current
    c_keys = load_group_keys(c.home, unlock_identity(c.home, PASSPHRASE))
    assert a_key.epoch == 1 and a_key.key_id not in {key.key_id for key in c_keys}
    sealed = nacl.secret.SecretBox(a_key.secret).encrypt(msgpack.packb("after"))
    for key in c_keys:
        with pytest.raises(nacl.exceptions.CryptoError):
            nacl.secret.SecretBox(key.secret).decrypt(sealed)


def test_revocation_is_refused_for_oneself_unknown_or_twice(group):
    a, c, _ = group
    for device, message in ((a.device_id, "itself"), ("12D3KooWnobody", "not an enrolled device")):
        with pytest.raises(Exception, match=message):
            a.call("devices.revoke", device=device)
    a.call("devices.revoke", device=c.device_id)
    with pytest.raises(Exception, match="already revoked"):
        a.call("devices.revoke", device=c.device_id)
    assert a.call("status")["group_epoch"] == 1
