"""Real node processes on loopback: pair, sync both ways, refuse strangers and wrong codes, survive kill -9."""

import signal

import numpy as np
import pytest

from node.api.rpc import RpcClient
from tests.processes import RunningNode, cli, converged, pair, wait_until


def stored_counts(node: RunningNode) -> tuple[int, int, int]:
    stores = node.call("status")["stores"]
    return stores["messages"], stores["memories"], stores["projector_backlog"]


@pytest.fixture
def first(tmp_path):
    home = tmp_path / "a"
    assert cli(home, "init").returncode == 0
    node = RunningNode(home)
    yield node
    node.stop()


def test_three_devices_pair_write_everywhere_and_converge(first, tmp_path):
    rng = np.random.default_rng(5)
    first.call("pref.set", key="theme", value="dark")
    first.call("note.edit", name="partner", text="Sam likes hiking.")
    doomed = first.call("msg.add", conversation="chat", text="delete me everywhere")["id"]
    nodes = [first]
    for name in ("b", "c"):
        done = pair(first, tmp_path / name)
        assert done.returncode == 0, done.stderr
        nodes.append(RunningNode(tmp_path / name, first.address))
    try:
        wait_until(lambda: converged(*nodes), what="the first convergence")
        a, b, c = nodes
        # Concurrent overwrites of one preference, and concurrent edits of one note: b writes while every other
        # device is stopped (its address book would find a running one), so it cannot have seen a's writes first.
        b.stop()
        a.call("pref.set", key="lang", value="en")
        a.call("note.edit", name="partner", text="Sam likes hiking in autumn.")
        a.stop()
        c.stop()
        nodes[1] = b = RunningNode(b.home)
        b.call("pref.set", key="lang", value="de")
        b.call("note.edit", name="partner", text="Sam really likes hiking.")
        b.stop()
        nodes[0] = a = RunningNode(a.home)
        nodes[1] = b = RunningNode(b.home, a.address)
        nodes[2] = c = RunningNode(c.home, a.address)
        for i, node in enumerate(nodes):
            node.call("msg.add", conversation="chat", text=f"hello from {i}", sentiment=0.1 * i, response_time_ms=100)
            node.call("memory.add", text=f"memory {i}", embedding=rng.standard_normal(384).tolist())
            node.call("counter.add", name="chats", delta=i + 1)
        c.call("forget", kind="message", id=doomed)
        wait_until(lambda: converged(*nodes), what="convergence after writes everywhere")
        for node in nodes:
            # The digest is of the replica, which runs ahead of the stores by the write in flight.
            wait_until(lambda node=node: stored_counts(node) == (3, 3, 0), what="3 messages, 3 memories, nothing to project")
            stores = node.call("status")["stores"]
            assert stores["analytics_rows"] == 3 and stores["vector_items"] == 3
        assert a.call("note.show", name="partner") == "Sam really likes hiking in autumn."
        assert a.call("msg.get", id=doomed) is None
        assert c.call("counter.get", name="chats") == 6
        assert any(row["key"] == "lang" for node in nodes for row in node.call("conflicts"))
        peers = {p["device_id"]: p for p in a.call("status")["peers"]}
        assert peers[b.device_id]["online"] and peers[b.device_id]["ops_behind_out"] == 0
    finally:
        for node in nodes:
            node.stop()


def test_a_wrong_code_is_refused_and_changes_nothing(first, tmp_path):
    digest = first.call("digest")
    done = pair(first, tmp_path / "b", code_override="00000-00000")
    assert done.returncode == 1 and "code" in done.stderr.lower()
    assert first.call("digest") == digest
    assert not (tmp_path / "b" / "config.json").exists()


def test_an_unenrolled_device_is_never_accepted(first, tmp_path):
    stranger_home = tmp_path / "stranger"
    assert cli(stranger_home, "init").returncode == 0
    assert pair(first, tmp_path / "b").returncode == 0
    stranger = RunningNode(stranger_home, first.address)
    member = RunningNode(tmp_path / "b", first.address)  # a control, dialling exactly as the stranger does
    try:
        first.call("pref.set", key="secret", value="for my devices only")
        wait_until(lambda: member.call("pref.get", key="secret") is not None, 60, "the paired device to get it")
        assert stranger.call("pref.get", key="secret") is None
        assert all(not p["online"] for p in stranger.call("status")["peers"])
        assert stranger.device_id not in {p["device_id"] for p in first.call("status")["peers"]}
    finally:
        stranger.stop()
        member.stop()


def test_a_peer_killed_mid_sync_and_restarted_converges(first, tmp_path):
    done = pair(first, tmp_path / "b")
    assert done.returncode == 0, done.stderr
    second = RunningNode(tmp_path / "b", first.address)
    with RpcClient.connect(first.home / "node.sock", timeout_s=60) as client:
        for i in range(300):
            client.call("msg.add", conversation="bulk", text=f"bulk {i}")
    second.stop(signal.SIGKILL)
    with RpcClient.connect(first.home / "node.sock", timeout_s=60) as client:
        for i in range(100):
            client.call("pref.set", key=f"k{i}", value=i)
    second = RunningNode(tmp_path / "b", first.address)
    try:
        wait_until(lambda: converged(first, second), what="convergence after restart")
        # The digest is of the replica, which runs ahead of the store by the write in flight.
        wait_until(lambda: second.call("status")["stores"]["messages"] == 300, what="300 messages stored, none twice")
    finally:
        second.stop()
