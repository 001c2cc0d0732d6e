"""What every `aico-node` command shares: the typer apps, the home, the passphrase, calls to the node, output."""

import getpass
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import trio
import typer
from rich.console import Console
from rich.markup import escape

from discovery.errors import DiscoveryError
from framing import ProtocolError
from node.errors import NodeError
from p2p.errors import P2pError
from relay.errors import RelayError
from stores.errors import StoreError

app = typer.Typer(
    name="aico-node",
    help="A local-first sync node: encrypted local stores, CRDT sync between a user's devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
pref_app = typer.Typer(help="Preferences: last writer wins per key.", no_args_is_help=True)
msg_app = typer.Typer(help="Conversation messages.", no_args_is_help=True)
memory_app = typer.Typer(help="Memories and semantic search.", no_args_is_help=True)
note_app = typer.Typer(help="Relationship notes and profile texts.", no_args_is_help=True)
analytics_app = typer.Typer(help="Analytics over conversations.", no_args_is_help=True)
devices_app = typer.Typer(help="This user's devices.", invoke_without_command=True)
pair_app = typer.Typer(help="Pair a new device with this user's group.", no_args_is_help=True)
for sub_app, name in (
    (pref_app, "pref"), (msg_app, "msg"), (memory_app, "memory"), (note_app, "note"),
    (analytics_app, "analytics"), (devices_app, "devices"), (pair_app, "pair"),
):  # fmt: skip
    app.add_typer(sub_app, name=name)
console = Console(stderr=True)
out = Console()
T = TypeVar("T")
PASSPHRASE_ENV = "AICO_PASSPHRASE"
# The roots of the errors that explain themselves: shown as one line, never as a traceback.
USER_FACING_ERRORS = (NodeError, StoreError, ProtocolError, RelayError, P2pError, DiscoveryError)
HOME_ENV = "AICO_HOME"


def default_home() -> Path:
    """Return the platform's user data folder for the node."""
    if HOME_ENV in os.environ:
        return Path(os.environ[HOME_ENV])
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "aico-node"


@app.callback()
def main_options(
    ctx: typer.Context,
    home: Annotated[
        Path | None, typer.Option("--home", help="Node home folder (default: AICO_HOME or the user data folder).")
    ] = None,
) -> None:
    """A local-first sync node: encrypted local stores, CRDT sync between a user's devices."""
    ctx.obj = home or default_home()


def home_of(ctx: typer.Context) -> Path:
    return ctx.find_root().obj


def fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


def passphrase(*, confirm: bool = False) -> str:
    """Return the passphrase from AICO_PASSPHRASE, or ask for it."""
    if PASSPHRASE_ENV in os.environ:
        return os.environ[PASSPHRASE_ENV]
    if not sys.stdin.isatty():
        raise fail(f"no passphrase: set {PASSPHRASE_ENV} or run in a terminal")
    first = getpass.getpass("passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise fail("the passphrases differ")
    return first


NODE_START_WAIT_S = 60.0  # how long a command waits for a starting node's socket
CALL_RETRIES = 2  # a call that timed out is sent again (with its key: it runs once) this many times
RESPONSE_MARGIN_S = 5.0  # a client waits this much longer than the node lets the call run
SOCKET_POLL_S = 0.1


def call(home: Path, method: str, **params: Any) -> Any:
    """Run a data command on the running node through its socket, or, with no node, on the stores directly; while a
    node starts (it holds the home, its socket is not up yet) wait for its socket instead."""
    from node.api.handlers import HANDLER_TIMEOUTS_S
    from node.api.rpc import REQUEST_TIMEOUT_S, NodeNotRunning, RpcClient, RpcRemoteError, RpcTimeoutError
    from node.home import NODE_HOLDER, HomeBusy, HomeLock, socket_path

    deadline = time.monotonic() + NODE_START_WAIT_S
    secret: str | None = None
    key = secrets.token_hex(16)  # the same on every retry: the node runs the call once
    timeout_s = HANDLER_TIMEOUTS_S.get(method, REQUEST_TIMEOUT_S) + RESPONSE_MARGIN_S
    retries = CALL_RETRIES
    while True:
        try:
            with RpcClient.connect(socket_path(home), timeout_s=timeout_s) as client:
                return client.call_keyed(method, params, key)
        except NodeNotRunning:
            pass
        except RpcTimeoutError as error:
            if retries == 0:
                raise fail(f"{error}; it may still finish") from None
            retries -= 1
            continue
        except RpcRemoteError as error:
            raise fail(str(error)) from None
        lock = HomeLock(home)
        holder = lock.holder()
        if not lock.node_starting() and (holder is None or NODE_HOLDER not in holder):
            secret = secret or passphrase()
            try:
                return trio.run(_call_directly, home, secret, method, params)
            except HomeBusy as busy:
                if not busy.by_node:
                    raise fail(f"{busy}; try again when it is done") from None
            except USER_FACING_ERRORS as error:
                raise fail(str(error)) from None
        if time.monotonic() > deadline:
            raise fail(f"{home} is held by a node whose socket did not open within {NODE_START_WAIT_S:.0f} s")
        time.sleep(SOCKET_POLL_S)


async def _call_directly(home: Path, secret: str, method: str, params: dict[str, Any]) -> Any:
    from node.app import Node

    async with Node.opened(home, secret, f"aico-node {method}") as node:
        return await node.handlers[method](params)


def run_async(async_fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async function, turning the node's and the stores' errors into clear messages."""
    try:
        return trio.run(async_fn)
    except USER_FACING_ERRORS as error:
        raise fail(str(error)) from None


def json_value(text: str) -> Any:
    """Parse a command-line value as JSON if it is JSON, else keep it as text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def embedding_file(path: Path | None) -> list[float] | None:
    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False).astype(float).reshape(-1).tolist()
    except (OSError, ValueError) as error:
        raise fail(f"cannot read embedding {path}: {error}") from None


def print_json(value: Any) -> None:
    print(json.dumps(value, default=str))


# -- node lifecycle ---------------------------------------------------------------------------------
