"""`pair join` as a person meets it on loopback: each way a join is refused is named with what to do, and a refused
join leaves nothing in the new device's home."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio

from node.api.rpc import RpcClient
from node.app import Node
from node.net.host import p2p_host
from node.net.pairing import join
from node.net.peers import compact_stopped_home
from node.trust.identity import DeviceIdentity
from node.trust.pairing import ATTEMPTS_MAX, CODE_ALPHABET, PairingError, display_code, parse_code
from stores import primary
from tests.processes import PASSPHRASE, RunningNode, cli, converged, env, wait_until


@pytest.fixture
def inviter(tmp_path) -> Iterator[RunningNode]:
    assert cli(tmp_path / "a", "init", "--name", "inviter").returncode == 0
    node = RunningNode(tmp_path / "a")
    yield node
    node.stop()


@contextmanager
def invite(node: RunningNode) -> Iterator[tuple[str, subprocess.Popen]]:
    """An open invite on `node`, as `pair invite --json` makes it: its code, and the process holding it open."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "--home", str(node.home), "pair", "invite", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield json.loads(process.stdout.readline())["code"], process
    finally:
        process.terminate()
        process.wait(timeout=30)


def joining(home, code: str, address: str) -> subprocess.CompletedProcess:
    return cli(home, "pair", "join", code, "--address", address, "--name", "joiner")


def wrong(code: str) -> str:
    canonical = parse_code(code)
    last = CODE_ALPHABET[(CODE_ALPHABET.index(canonical[-1]) + 1) % len(CODE_ALPHABET)]
    return display_code(canonical[:-1] + last)


def assert_refused(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) <= 2 and "Traceback" not in done.stderr, done.stderr
    assert all(word in done.stderr for word in words), done.stderr


def test_a_wrong_code_says_so_and_how_many_attempts_are_left_and_leaves_no_home(inviter, tmp_path):
    with invite(inviter) as (code, _):
        done = joining(tmp_path / "b", wrong(code), inviter.address)
    assert_refused(done, "wrong", f"{ATTEMPTS_MAX - 1} more attempts")
    assert not (tmp_path / "b").exists()


def test_a_device_with_no_open_invite_says_so(inviter, tmp_path):
    done = joining(tmp_path / "b", "00000-00000", inviter.address)
    assert_refused(done, "no invite is open", "pair invite")
    assert not (tmp_path / "b").exists()


def test_a_closed_invite_says_it_was_closed_even_for_the_right_code(inviter, tmp_path):
    with invite(inviter) as (code, process):
        process.terminate()
        process.wait(timeout=30)
        done = joining(tmp_path / "b", code, inviter.address)
    assert_refused(done, "closed on the inviting device", "make a new one")


def test_an_invite_out_of_attempts_refuses_even_the_right_code(inviter, tmp_path):
    async def spend_attempts(code: str) -> None:
        async with p2p_host(DeviceIdentity(os.urandom(32))) as host:
            for _ in range(ATTEMPTS_MAX):
                with pytest.raises(PairingError, match="wrong"):
                    await join(host, DeviceIdentity(os.urandom(32)), wrong(code), inviter.address, "guesser")

    with invite(inviter) as (code, _):
        trio.run(spend_attempts, code)
        done = joining(tmp_path / "b", code, inviter.address)
    assert_refused(done, "no more attempts", "make a new one")
    assert not (tmp_path / "b").exists()


def test_an_expired_invite_says_it_expired(inviter, tmp_path):
    with RpcClient.connect(inviter.home / "node.sock", timeout_s=30) as client:
        updates = client.stream("pair.invite", ttl_s=1.0)
        code = next(updates)["code"]
        assert next(updates) == {"expired": True}
        updates.close()
    done = joining(tmp_path / "b", code, inviter.address)
    assert_refused(done, "expired", "make a new one")


def test_an_inviter_that_cannot_be_reached_is_named(tmp_path):
    nobody = DeviceIdentity(os.urandom(32)).device_id
    done = joining(tmp_path / "b", "00000-00000", f"/ip4/127.0.0.1/tcp/9/p2p/{nobody}")
    assert_refused(done, "cannot reach the inviting device")
    assert not (tmp_path / "b").exists()


def test_the_joined_device_is_known_by_its_name_everywhere(inviter, tmp_path):
    with invite(inviter) as (code, _):
        assert joining(tmp_path / "b", code, inviter.address).returncode == 0
    names = {device["name"] for device in inviter.call("devices.list")}
    assert names == {"inviter", "joiner"}


def import_history(node: RunningNode, folder, messages: int, conversations: int) -> None:
    """Import `messages` messages spread over `conversations` conversations into the running node's home."""
    history = folder / "history.jsonl"
    history.write_text("".join(
        json.dumps({"type": "message", "conversation": f"c{number % conversations}", "text": f"message {number}",
                    "ts_ms": number}) + "\n"
        for number in range(messages)
    ))  # fmt: skip
    assert cli(node.home, "import", str(history), timeout_s=300).returncode == 0


def test_a_join_ends_once_the_device_holds_everything_on_disk(inviter, tmp_path):
    # Ops applied but not yet written when the command ended were lost to the joined device's stores: a join of a
    # 1M-message home said "synced 1000302 ops" and held 976k.
    import_history(inviter, tmp_path, 30_000, conversations=7)
    with invite(inviter) as (code, _):
        joined = joining(tmp_path / "b", code, inviter.address)
    assert joined.returncode == 0, joined.stderr
    on_disk = json.loads(cli(tmp_path / "b", "digest").stdout)
    assert on_disk == inviter.call("digest") and on_disk["counts"]["messages"] == 30_000


async def _compact(home) -> int:
    """Compact a home's op log as its running node does every COMPACT_EVERY_S (node/net/sessions.py)."""
    async with Node.opened(home, PASSPHRASE, "a test compacting the log") as node:
        return await compact_stopped_home(node.data, node.identity.device_id)


async def _log_bases(home) -> dict[str, int]:
    async with Node.opened(home, PASSPHRASE, "a test reading the log") as node:
        return await node.data.sql.run(primary.log_bases)


def _told_all(node: RunningNode, name: str) -> bool:
    peers = node.call("status", stores=False)["peers"]
    return any(peer["name"] == name and peer["ops_behind_out"] == 0 for peer in peers)


def test_a_device_joining_a_compacted_home_gets_its_state_in_parts_and_holds_everything(inviter, tmp_path):
    import_history(inviter, tmp_path, 5000, conversations=3)
    assert cli(inviter.home, "pref", "set", "theme", '"dark"').returncode == 0
    with invite(inviter) as (code, _):
        assert joining(tmp_path / "b", code, inviter.address).returncode == 0
    # The inviter compacts what every other device said it holds: `pair join` sends the ACK of its last write as it
    # ends, so the inviter may compact at once.
    wait_until(lambda: _told_all(inviter, "joiner"), what="the joiner to tell the inviter what it holds")
    inviter.stop()
    assert trio.run(_compact, inviter.home) > 0
    restarted = RunningNode(inviter.home)
    try:
        with invite(restarted) as (code, _):
            joined = cli(tmp_path / "c", "pair", "join", code, "--address", restarted.address, "--name", "third")
        assert joined.returncode == 0, joined.stderr
        on_disk = json.loads(cli(tmp_path / "c", "digest").stdout)
        assert on_disk == restarted.call("digest") and on_disk["counts"]["messages"] == 5000
        status = json.loads(cli(tmp_path / "c", "status", "--json").stdout)
        assert status["ops"] == status["ops_stored"] == restarted.call("status", stores=False)["ops"]
        assert status["state_received"] is None
        assert trio.run(_log_bases, tmp_path / "c")  # it skipped the ops whose effect the state brought
        # The device paired before the compaction has every op it needs still logged: it syncs a new write as ever.
        assert cli(restarted.home, "pref", "set", "theme", '"light"').returncode == 0
        second = RunningNode(tmp_path / "b", restarted.address)
        try:
            wait_until(lambda: converged(restarted, second), what="the first joiner to take the new write")
        finally:
            second.stop()
    finally:
        restarted.stop()
