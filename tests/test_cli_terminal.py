"""Human output in a real terminal 120 columns wide (a pseudo-terminal) and in a pipe: whole multiaddrs and ids on
one line, device names, times as words, no Python reprs."""

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cli.show import ago, short_id, until
from tests.processes import RunningNode, cli, env, pair, wait_until

COLUMNS = 120
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")  # CSI and OSC sequences
PYTHON_REPRS = re.compile(r"\b(None|True|False)\b|\{'|\['")
UNIX_TIME = re.compile(r"\b1[6-9]\d{8}(\.\d+)?\b")  # seconds since 1970, 2020 to 2033
QUIET_S = 1.0


def in_terminal(args: list[str], *, done: Callable[[str], bool] | None = None, timeout_s: float = 60) -> str:
    """Run `aico-node args` in a new pseudo-terminal COLUMNS wide and return what it showed, escapes removed.

    With `done`, the command is stopped once `done(shown)` holds and it has printed nothing for QUIET_S; without,
    it runs to its end.
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, COLUMNS, 0, 0))
    environment = {k: v for k, v in env().items() if k not in ("COLUMNS", "LINES")} | {"TERM": "xterm-256color"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", *args], stdin=slave, stdout=slave, stderr=slave, env=environment,
        start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    shown = bytearray()
    deadline = time.monotonic() + timeout_s
    last_output = time.monotonic()
    try:
        while True:
            assert time.monotonic() < deadline, f"timed out; the terminal showed:\n{_plain(shown)}"
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the command closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
                last_output = time.monotonic()
            elif done is not None and done(_plain(shown)) and time.monotonic() - last_output > QUIET_S:
                break
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)
        os.close(master)
    if done is None:
        assert process.returncode == 0, _plain(shown)
    return _plain(shown)


def _plain(shown: bytes | bytearray) -> str:
    return ESCAPES.sub("", bytes(shown).decode(errors="replace")).replace("\r\n", "\n")


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """Two paired nodes on loopback, online with each other, with a message synced."""
    root: Path = tmp_path_factory.mktemp("terminal")
    assert cli(root / "a", "init").returncode == 0
    a = RunningNode(root / "a")
    b = None
    try:
        joined = pair(a, root / "b")
        assert joined.returncode == 0, joined.stderr
        b = RunningNode(root / "b", a.address)
        a.call("msg.add", conversation="chat", text="hello")
        wait_until(lambda: _online(a) and _online(b), 60, "both nodes online with each other")
        yield a, b
    finally:
        for node in (b, a):
            if node is not None:
                node.stop()


def _online(node: RunningNode) -> bool:
    peers = node.call("status", stores=False)["peers"]
    return bool(peers) and all(peer["online"] and not peer["ops_behind_in"] for peer in peers)


def _assert_human(text: str) -> None:
    assert not PYTHON_REPRS.search(text), text
    assert not UNIX_TIME.search(text), text
    assert "Traceback" not in text, text


@pytest.mark.parametrize("where", ["terminal", "pipe"])
def test_status_reads_as_a_summary_with_whole_addresses_names_and_times_in_words(paired, where):
    a, b = paired
    facts = json.loads(cli(a.home, "status", "--json").stdout)
    if where == "terminal":
        text = in_terminal(["--home", str(a.home), "status"])
    else:
        done = cli(a.home, "status")  # not a terminal: rich would wrap at 80 columns
        assert done.returncode == 0, done.stderr
        text = done.stdout
    lines = text.splitlines()
    _assert_human(text)
    assert facts["addresses"] and all(any(address in line for line in lines) for address in facts["addresses"]), text
    this = next(line for line in lines if line.startswith("This device"))
    assert facts["name"] and facts["name"] in this and short_id(facts["device_id"]) in this
    assert f"epoch {facts['group_epoch']}" in this
    [peer] = facts["peers"]
    [row] = [line for line in lines if short_id(peer["device_id"]) in line]
    assert peer["name"] and peer["name"] in row and "online" in row and "in sync" in row, text
    assert re.search(r"last sync (just now|\d+ (s|min) ago)", row), row
    assert any("1 message" in line for line in lines), text


def test_pair_invite_shows_its_code_and_whole_commands_in_a_terminal(paired):
    a, _ = paired
    addresses = json.loads(cli(a.home, "status", "--json").stdout)["addresses"]
    text = in_terminal(["--home", str(a.home), "pair", "invite"], done=lambda shown: "pair join" in shown)
    _assert_human(text)
    assert re.search(r"^code: \S+$", text, re.MULTILINE), text
    commands = [line.strip() for line in text.splitlines() if "pair join" in line]
    assert commands, text
    for command in commands:
        # Each join command on one line, whole: `aico-node pair join CODE [--address MADDR]`.
        words = command.split()
        assert words[:3] == ["aico-node", "pair", "join"] and len(words) in (4, 6), command
        if len(words) == 6:
            assert words[4] == "--address" and words[5] in addresses, command


@pytest.mark.parametrize(
    ("seconds_ago", "said"),
    [(None, "never"), (2, "just now"), (30, "30 s ago"), (100, "2 min ago"), (7200, "2 h ago"), (3 * 86_400, "3 days ago")],
)
def test_times_read_as_words(seconds_ago, said):
    now_s = 1_800_000_000.0
    assert ago(None if seconds_ago is None else now_s - seconds_ago, now_s) == said


def test_times_ahead_read_as_words():
    assert until(1_800_000_600.0, 1_800_000_000.0) == "in 10 min"
    assert until(1_799_999_940.0, 1_800_000_000.0) == "60 s ago"
