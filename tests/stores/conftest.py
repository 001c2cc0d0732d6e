"""Shared fixtures for the store tests: real engines in tmp_path, and a tripwire on network use."""

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _read_folder(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file())


@pytest.fixture
def folder_bytes() -> Callable[[Path], bytes]:
    """Return a function giving the concatenated bytes of every file under a folder."""
    return _read_folder


def _local_only(real: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"store code tried to reach {address!r} over the network")
        return real(sock, address)

    return guarded


def _refuse_lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
    raise AssertionError(f"store code tried to resolve {host!r}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test whose code tries to resolve a name or connect to an IP address."""
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, _local_only(getattr(socket.socket, name)))
    monkeypatch.setattr(socket, "getaddrinfo", _refuse_lookup)
