"""Revocation with real node processes on loopback: the revoked device is cut off, its later writes count
nowhere, and the devices that stay get the new group key, also one that was offline at the time (from the
relay's mailbox)."""


import msgpack
import nacl.secret
import pytest
import trio

from node.api.rpc import RpcRemoteError
from node.app import Node
from node.trust.identity import load_group_keys, unlock_identity
from node.trust.keyring import KeyRing
from tests.processes import PASSPHRASE, RunningNode, cli, converged, pair, wait_until
from tests.test_mailbox_processes import RunningRelay


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
    try:
        c.call("pref.set", key="theme", value="stolen")  # stamped after its revocation, which c has not heard of yet
    except RpcRemoteError as error:  # unless c already drained it from the mailbox: then it refuses to write at all
        assert "revoked" in str(error)
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


def test_two_revocations_made_at_once_end_with_a_key_neither_revoked_device_holds(tmp_path):
    assert cli(tmp_path / "a", "init").returncode == 0
    a = RunningNode(tmp_path / "a")
    nodes = [a]
    try:
        for name in ("b", "c", "d"):
            done = pair(a, tmp_path / name)
            assert done.returncode == 0, done.stderr
        b = RunningNode(tmp_path / "b", a.address)
        nodes.append(b)
        wait_until(lambda: converged(a, b), what="a and b to converge")
        c_id, d_id = (unlock_identity(tmp_path / name, PASSPHRASE).device_id for name in ("c", "d"))
        # Apart, a revokes c and b revokes d: each makes an epoch-1 key that the other's revoked device receives.
        b.stop()
        a.call("devices.revoke", device=c_id)
        a.stop()
        b = nodes[1] = RunningNode(tmp_path / "b")
        b.call("devices.revoke", device=d_id)
        a = nodes[0] = RunningNode(tmp_path / "a", b.address)
        wait_until(lambda: a.call("status")["group_epoch"] == b.call("status")["group_epoch"] == 2, 60, "epoch 2")
        wait_until(lambda: converged(a, b), 60, "a and b to converge")
    finally:
        for node in nodes:
            node.stop()

    async def holders() -> tuple[bytes, set[str]]:
        async with Node.opened(tmp_path / "a", PASSPHRASE, "test") as node:
            return node.keyring.current.key_id, node.keyring.holders_of_current(node.data.replica.settings)

    key_id, holding = trio.run(holders)
    assert c_id not in holding and d_id not in holding and len(holding) == 2
    assert key_id == KeyRing(tmp_path / "b", unlock_identity(tmp_path / "b", PASSPHRASE)).current.key_id
