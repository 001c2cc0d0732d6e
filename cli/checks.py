"""Checks on what a person types, made where it enters, before a store or the node's socket is opened.

Each refuses with typer.BadParameter, a usage error: one line naming the value, what is wrong and how to write it,
and exit code 2.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import multiaddr
import typer

from node.api.params import ParamError, checked_metadata, checked_name, checked_text, parsed_json

T = TypeVar("T")
LISTEN_EXAMPLE = "/ip4/0.0.0.0/tcp/4001"
PEER_EXAMPLE = "/ip4/192.168.1.20/tcp/4001/p2p/12D3KooW..."


def _protocols(text: str, example: str) -> list[str]:
    """The protocol names of the multiaddr `text`, or a usage error saying how to write one like `example`."""
    try:
        addr = multiaddr.Multiaddr(text)
    except Exception as error:  # the multiaddr package raises several types for malformed text
        raise typer.BadParameter(f"{text!r} is not a multiaddr ({_reason(error)}); write it like {example}") from None
    return [protocol.name for protocol in addr.protocols()]


def _reason(error: Exception) -> str:
    """The multiaddr package's message without the input it repeats."""
    reason = str(error).split(" (string: ", 1)[0]
    if reason.startswith("Invalid MultiAddr"):
        reason = reason.split(": ", 1)[-1]
    return "its peer id after /p2p/ is not valid" if reason.startswith("Invalid CID") else reason


def listen_address(text: str) -> str:
    """A TCP address to listen on: /ip4/<address>/tcp/<port> or /ip6/<address>/tcp/<port>."""
    protocols = _protocols(text, LISTEN_EXAMPLE)
    if protocols not in (["ip4", "tcp"], ["ip6", "tcp"]):
        raise typer.BadParameter(f"{text} is not a TCP address to listen on; write it like {LISTEN_EXAMPLE}")
    return text


def peer_address(text: str) -> str:
    """A device's address: a TCP multiaddr (possibly through a relay's circuit) ending in /p2p/<peer id>."""
    protocols = _protocols(text, PEER_EXAMPLE)
    if protocols[-1:] != ["p2p"]:
        raise typer.BadParameter(
            f"{text} does not end in /p2p/<peer id>; copy the whole address the other device's `aico-node status` "
            f"shows, like {PEER_EXAMPLE}"
        )
    if "tcp" not in protocols:
        raise typer.BadParameter(f"{text} has no /tcp/<port>; write it like {PEER_EXAMPLE}")
    return text


def relay_address(text: str) -> str:
    """A relay's address: a TCP multiaddr ending in /p2p/<relay peer id>, without a circuit."""
    protocols = _protocols(text, PEER_EXAMPLE)
    if protocols[-1:] != ["p2p"] or "tcp" not in protocols or "p2p-circuit" in protocols:
        raise typer.BadParameter(
            f"{text} is not a relay's address; copy one of the `addresses` `aico-node relay` prints, which end in "
            "/p2p/<relay id>"
        )
    return text


def sql_engine(text: str) -> str:
    """The name of a primary SQL engine the stores support."""
    from stores.sql import SQL_ENGINES

    if text not in SQL_ENGINES:
        raise typer.BadParameter(f"no SQL engine is named {text!r}; choose {' or '.join(SQL_ENGINES)}")
    return text


def checked(check: Callable[..., T], value: object, *args: Any, **kwargs: Any) -> T:
    """`check(value, ...)`'s result, its ParamError turned into a usage error."""
    try:
        return check(value, *args, **kwargs)
    except ParamError as error:
        raise typer.BadParameter(str(error)) from None


def name(value: str, what: str) -> str:
    """A name (a key, a conversation, a note's name): non-empty, short, on one line."""
    return checked(checked_name, value, what)


def text(value: str, what: str, *, empty_ok: bool = False) -> str:
    """A text (a message, a memory, a note): non-empty unless `empty_ok`, and within the size limit."""
    return checked(checked_text, value, what, empty_ok=empty_ok)


def metadata_json(value: str, option: str) -> dict[str, Any]:
    """A JSON object of short scalar values, as memory metadata or a search filter takes."""
    return checked(lambda raw: checked_metadata(parsed_json(raw, option), option), value)


def embedding_file(path: Path, home: Path) -> list[float]:
    """The embedding in the .npy file at `path`: one row of finite numbers, as many as the home's stores take."""
    import numpy as np

    from node.home import HomeError, load_store_config

    try:
        array = np.load(path, allow_pickle=False)
        vector = np.asarray(array, dtype=float).reshape(-1)
    except OSError as error:
        raise typer.BadParameter(f"cannot read {path}: {error.strerror}", param_hint="--embedding") from None
    except (ValueError, TypeError):
        raise typer.BadParameter(
            f"{path} is not a .npy file of numbers; write one with numpy.save", param_hint="--embedding"
        ) from None
    try:
        dims = load_store_config(home).embedding_dims
    except HomeError:
        dims = vector.size  # an uninitialised home is reported when the command opens it
    if array.ndim > 2 or (array.ndim == 2 and array.shape[0] != 1) or vector.size != dims:
        raise typer.BadParameter(
            f"{path} holds an array of shape {array.shape}; this home's embeddings are one row of {dims} numbers",
            param_hint="--embedding",
        )
    if not np.all(np.isfinite(vector)):
        raise typer.BadParameter(f"{path} holds NaN or infinite numbers", param_hint="--embedding")
    return [float(number) for number in vector]
