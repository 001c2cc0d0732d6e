"""Real `aico-node` processes on loopback for tests: the CLI, a running node and its socket, pairing, waiting."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from node.api.rpc import RpcClient

PASSPHRASE = "sync test passphrase"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def env() -> dict:
    return {**os.environ, "AICO_PASSPHRASE": PASSPHRASE}


def cli(home: Path, *args: str, timeout_s: float = 120, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cli", "--home", str(home), *args]
    return subprocess.run(
        command, capture_output=True, text=True, env={**env(), **(extra_env or {})}, timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def in_netns(namespace: str | None) -> list[str]:
    """The command prefix that runs a process in `namespace` (none for this host's own network)."""
    return ["ip", "netns", "exec", namespace] if namespace else []


class RunningNode:
    """An `aico-node run` process (on loopback unless `listen` and `netns` say where), and a socket client to it; its
    page is off unless `gui` gives an address for it."""

    def __init__(
        self, home: Path, *peers: str, relay: str | list[str] | None = None, gui: str | None = None,
        listen: str = LOOPBACK, netns: str | None = None,
    ) -> None:  # fmt: skip
        self.home = home
        command = [*in_netns(netns), sys.executable, "-m", "cli", "--debug", "--home", str(home)]
        command += ["run", "--listen", listen, "--no-mdns"]
        for peer in peers:
            command += ["--peer", peer]
        for address in [relay] if isinstance(relay, str) else relay or []:
            command += ["--relay", address]
        command += ["--gui", gui] if gui else ["--no-gui"]
        # Its log goes to a file beside the home, so a node that dies can say why.
        self.log = home.parent / f"{home.name}.log"
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, text=True, env=env(), stdin=subprocess.DEVNULL
            )
        line = self.process.stdout.readline()
        assert line, self.log.read_text()
        self.ready = json.loads(line)
        self.address = self.ready["addresses"][0]
        self.device_id = self.ready["device_id"]

    def call(self, method: str, **params):
        if self.process.poll() is not None:
            raise AssertionError(f"the node at {self.home} has exited: {self.log.read_text()[-3000:]}")
        with RpcClient.connect(self.home / "node.sock", timeout_s=60) as client:
            return client.call(method, **params)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)


def pair(
    inviter: RunningNode, joiner_home: Path, code_override: str | None = None, name: str = "paired device"
) -> subprocess.CompletedProcess:
    invite = subprocess.Popen(
        [sys.executable, "-m", "cli", "--home", str(inviter.home), "pair", "invite", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        offer = json.loads(invite.stdout.readline())
        assert offer["addresses"] and "expires" in offer
        return cli(
            joiner_home, "pair", "join", code_override or offer["code"], "--address", inviter.address, "--name", name
        )
    finally:
        invite.terminate()
        invite.wait(timeout=30)


def wait_until(predicate, timeout_s: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def converged(*nodes: RunningNode) -> bool:
    return len({json.dumps(node.call("digest"), sort_keys=True) for node in nodes}) == 1
