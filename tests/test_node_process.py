"""The node as a real process: start, serve its socket, stop cleanly, survive kill -9, refuse bad input."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from node.rpc import RpcClient, RpcRemoteError

PASSPHRASE = "correct horse battery staple"
DIMS = 384


def cli(home: Path, *args: str, passphrase: str | None = PASSPHRASE, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "AICO_PASSPHRASE"}
    if passphrase is not None:
        env["AICO_PASSPHRASE"] = passphrase
    command = [sys.executable, "-m", "node", "--home", str(home), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s, stdin=subprocess.DEVNULL)


def start_node(home: Path) -> subprocess.Popen:
    env = {**os.environ, "AICO_PASSPHRASE": PASSPHRASE}
    process = subprocess.Popen(
        [sys.executable, "-m", "node", "--home", str(home), "run"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    line = process.stdout.readline()
    assert line, process.stderr.read()
    assert json.loads(line)["ready"]
    return process


def wait_for_projector(client: RpcClient, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stores = client.call("status")["stores"]
        if stores["projector_backlog"] == 0:
            return stores
        time.sleep(0.1)
    raise AssertionError("projector never caught up")


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "home"
    done = cli(home, "init")
    assert done.returncode == 0, done.stderr
    return home


def test_run_serves_the_socket_and_stops_cleanly_on_sigterm(home):
    node = start_node(home)
    try:
        socket_file = home / "node.sock"
        assert socket_file.stat().st_mode & 0o777 == 0o600
        done = cli(home, "pref", "set", "theme", "dark", passphrase=None)  # through the socket: no passphrase
        assert done.returncode == 0, done.stderr
        assert json.loads(cli(home, "pref", "get", "theme", passphrase=None).stdout) == "dark"
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=30) == 0
    assert not socket_file.exists()
    assert all(path.stat().st_mode & 0o077 == 0 for path in home.rglob("*") if path.is_file())
    assert json.loads(cli(home, "pref", "get", "theme").stdout) == "dark"  # directly from the stores


def test_kill_9_during_a_stream_of_writes_loses_no_acknowledged_write(home):
    node = start_node(home)
    acknowledged_messages, acknowledged_memories = [], []
    rng = np.random.default_rng(3)
    with RpcClient.connect(home / "node.sock") as client:
        for i in range(60):
            result = client.call("msg.add", conversation=f"c{i % 4}", text=f"message {i}", sentiment=0.1)
            acknowledged_messages.append(result["id"])
            if i % 3 == 0:
                embedding = rng.standard_normal(DIMS).tolist()
                acknowledged_memories.append(client.call("memory.add", text=f"memory {i}", embedding=embedding)["id"])
        # Keep writing from another process while the node dies mid-stream.
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(home / "node.sock")], stdout=subprocess.PIPE, text=True
    )
    first = writer.stdout.readline()  # the writer has started (on a busy machine that can take over a second)
    time.sleep(random.uniform(0.0, 0.5))
    node.send_signal(signal.SIGKILL)
    node.wait(timeout=30)
    written = [first, *writer.communicate(timeout=60)[0].splitlines()]
    acknowledged_messages += [line.strip() for line in written if line.strip()]
    assert len(acknowledged_messages) > 60, "the writer acknowledged nothing before the kill"

    node = start_node(home)
    try:
        with RpcClient.connect(home / "node.sock") as client:
            for message_id in acknowledged_messages:
                assert client.call("msg.get", id=message_id) is not None, f"acknowledged {message_id} was lost"
            stores = wait_for_projector(client)
            assert stores["analytics_rows"] == stores["messages"] >= len(acknowledged_messages)
            assert stores["vector_items"] == stores["memories"] == len(acknowledged_memories)
            digest = client.call("digest")
            rebuilt = client.call("rebuild")
            assert rebuilt["analytics"] == stores["messages"] and rebuilt["vectors"] == stores["memories"]
            assert client.call("digest") == digest
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=30)


_WRITER = """
import sys
from node.rpc import RpcClient
with RpcClient.connect(sys.argv[1]) as client:
    for i in range(100000):
        try:
            result = client.call("msg.add", conversation="late", text=f"late {i}")
        except Exception:
            break
        print(result["id"], flush=True)
"""


def test_malformed_and_oversized_socket_requests_are_refused_and_the_node_keeps_serving(home):
    node = start_node(home)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(10)
            raw.connect(str(home / "node.sock"))
            raw.sendall((5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1")
            reply = raw.recv(65536)
            assert b"malformed_request" in reply
        with RpcClient.connect(home / "node.sock") as client:
            digest = client.call("digest")
            with pytest.raises(RpcRemoteError) as raised:
                client.call("no.such.method")
            assert raised.value.type == "unknown_method"
        with RpcClient.connect(home / "node.sock") as client:
            with pytest.raises(RpcRemoteError, match="exceeds"):
                client.call("pref.set", key="big", value="x" * (2 << 20))
        with RpcClient.connect(home / "node.sock") as client:
            with pytest.raises(RpcRemoteError, match="non-empty string"):
                client.call("msg.add", conversation="", text="x")
            with pytest.raises(RpcRemoteError, match="384"):
                client.call("memory.add", text="x", embedding=[1.0, 2.0])
            assert client.call("digest") == digest
            assert client.call("pref.set", key="ok", value=1)["value"] == 1
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=30)


def test_bad_commands_and_wrong_passphrases_get_clear_errors_and_change_nothing(home):
    before = {path: path.read_bytes() for path in home.rglob("*") if path.is_file()}
    done = cli(home, "pref", "set", "theme", "dark", passphrase="wrong passphrase")
    assert done.returncode == 1 and "wrong passphrase" in done.stderr
    after = {path: path.read_bytes() for path in home.rglob("*") if path.is_file()}
    assert after == before
    done = cli(home, "frobnicate")
    assert done.returncode == 2 and "No such command" in done.stderr
    done = cli(home, "forget", "message", "no-such-id")
    assert done.returncode == 1 and "no message with id" in done.stderr
    done = cli(home.parent / "nowhere", "digest")
    assert done.returncode == 1 and "init" in done.stderr
    done = cli(home, "init")
    assert done.returncode == 1 and "already" in done.stderr


def test_text_memories_without_the_embed_extra_say_how_to_get_it(home):
    from node.embed import embedder_available

    if embedder_available():
        done = cli(home, "memory", "add", "likes green tea")
        assert done.returncode == 0, done.stderr
        found = json.loads(cli(home, "memory", "search", "green tea", "-k", "1").stdout)
        assert found[0]["text"] == "likes green tea"
    else:
        done = cli(home, "memory", "add", "likes green tea")
        assert done.returncode == 1 and "aico-node[embed]" in done.stderr
