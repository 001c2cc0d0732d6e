"""Throwaway network namespaces on a private bridge: real multicast in tests without touching this host's network."""

# `lan(n)` makes n hosts `aico-t-<random>-<i>`, each with `lo` and an `eth0` on a bridge that lives in a namespace of
# its own, so nothing is added to the root namespace. `loopback_host()` makes one namespace with `lo` only. Both tear
# everything down on exit, even after a failure, and skip the calling test when namespaces cannot be made here.

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

PREFIX = "aico-t-"
REPO_ROOT = Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
MAX_HOSTS = 200


class NetnsError(Exception):
    """An `ip` command failed while building or tearing down test namespaces."""


@attrs.frozen
class NetnsHost:
    """One namespace and the IPv4 address its processes use (on `eth0`, or 127.0.0.1 when loopback-only)."""

    namespace: str
    address: str


@functools.cache
def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here (checked once, by making and deleting one), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}{secrets.token_hex(3)}-probe"
    try:
        _ip("netns", "add", probe)
    except NetnsError as error:
        return f"`ip netns` is unavailable here: {error}"
    _ip("netns", "delete", probe)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Lan:
    """Hosts in their own namespaces, and the processes started in them (stopped when the LAN is torn down)."""

    def __init__(self, hosts: list[NetnsHost]) -> None:
        self.hosts = hosts
        self._processes: list[subprocess.Popen[str]] = []

    def popen(self, host: NetnsHost, argv: list[str]) -> subprocess.Popen[str]:
        """Start `argv` inside `host`'s namespace from the repository root, with text pipes for stdout and stderr."""
        process = subprocess.Popen(
            ["ip", "netns", "exec", host.namespace, *argv],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._processes.append(process)
        return process

    def python(self, host: NetnsHost, module: str, *args: str) -> subprocess.Popen[str]:
        """Start `python -m module args...` (this interpreter) inside `host`'s namespace."""
        return self.popen(host, [sys.executable, "-m", module, *args])

    def stop_processes(self) -> None:
        """Kill every process started in this LAN's namespaces that is still running, and reap the ones started here."""
        for process in self._processes:
            if process.poll() is None:
                process.kill()
        # Children of those processes would otherwise keep their pipes open and outlive the test.
        for host in self.hosts:
            _kill_namespace_processes(host.namespace)
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.communicate(timeout=STOP_TIMEOUT_S)


def _kill_namespace_processes(namespace: str) -> None:
    # Only processes inside one of our own fresh namespaces are listed, so nothing else on this machine is touched.
    listed = subprocess.run(
        ["ip", "netns", "pids", namespace], check=False, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def _add_namespace(stack: contextlib.ExitStack, namespace: str) -> None:
    _ip("netns", "add", namespace)
    stack.callback(_delete_namespace, namespace)
    _ip("-n", namespace, "link", "set", "lo", "up")
    # lo lacks the MULTICAST flag by default; set it so every link in our namespaces is marked multicast-capable.
    _ip("-n", namespace, "link", "set", "lo", "multicast", "on")


def _delete_namespace(namespace: str) -> None:
    _kill_namespace_processes(namespace)
    # Deleting a namespace also deletes the veth ends and the bridge inside it.
    _ip("netns", "delete", namespace)


@contextlib.contextmanager
def _namespaces() -> Iterator[tuple[contextlib.ExitStack, str]]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with contextlib.ExitStack() as stack:
        yield stack, f"{PREFIX}{secrets.token_hex(3)}"


@contextlib.contextmanager
def lan(count: int) -> Iterator[Lan]:
    """`count` hosts on one bridged IPv4 /24 (10.123.<random>.0/24, host i at .i+1), multicast on, torn down on exit."""
    if not 1 <= count <= MAX_HOSTS:
        raise NetnsError(f"a LAN has 1 to {MAX_HOSTS} hosts, got {count}")
    with _namespaces() as (stack, prefix):
        bridge = f"{prefix}-br"
        _add_namespace(stack, bridge)
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", bridge, "link", "set", "br0", "up")
        subnet = secrets.randbelow(256)
        hosts = []
        for index in range(count):
            namespace = f"{prefix}-{index}"
            _add_namespace(stack, namespace)
            # Both veth ends are created directly inside our namespaces, never in the root one.
            _ip("-n", bridge, "link", "add", f"p{index}", "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _ip("-n", bridge, "link", "set", f"p{index}", "master", "br0", "up")
            address = f"10.123.{subnet}.{index + 1}"
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "multicast", "on", "up")
            hosts.append(NetnsHost(namespace, address))
        network = Lan(hosts)
        stack.callback(network.stop_processes)
        yield network


@contextlib.contextmanager
def loopback_host() -> Iterator[Lan]:
    """One namespace with only `lo` (up, multicast on): a loopback that no other process on this machine shares."""
    with _namespaces() as (stack, prefix):
        namespace = f"{prefix}-lo"
        _add_namespace(stack, namespace)
        network = Lan([NetnsHost(namespace, "127.0.0.1")])
        stack.callback(network.stop_processes)
        yield network
