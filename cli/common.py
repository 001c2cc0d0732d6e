"""What every `aico-node` command shares: the typer apps, the home, the passphrase, calls to the node, output."""

import contextlib
import functools
import getpass
import json
import os
import secrets
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import attrs
import trio
import typer
from rich.console import Console
from rich.markup import escape

from cli.logs import LOG_ENV, LogLevelError, configure_logging, level_from


def _argument_type(self: typer.core.TyperArgument, ctx: Any) -> str | None:
    """No type after an argument in help (typer lists `CODE <str>`): its name already is the placeholder."""
    return None


def _argument_usage(self: typer.core.TyperArgument, ctx: Any) -> list[str]:
    """An argument in the usage line as click writes one: `CODE` when required (typer: `{CODE}`), `[TEXT]` if not."""
    name = self.display_name_raw + ("..." if self.nargs != 1 else "")
    return [name if self.required else f"[{name}]"]


# typer builds every argument as a TyperArgument (typer.main.get_click_param) and takes no other class for it.
typer.core.TyperArgument.display_type_rich = _argument_type  # type: ignore[method-assign,assignment]
typer.core.TyperArgument.get_usage_pieces = _argument_usage  # type: ignore[method-assign]


HELP_COLUMNS_MAX = 160


def _typer(help: str, **options: Any) -> typer.Typer:
    # Plain click help: typer's rich panels show flags as `<bool>` and lists as `<list[str]>`, the help option too.
    # Help fills the terminal's width (click stops at 80 columns unless told), so multiaddrs in it stay whole.
    return typer.Typer(
        help=help, rich_markup_mode=None, pretty_exceptions_enable=False,
        context_settings={"max_content_width": HELP_COLUMNS_MAX}, **options,
    )  # fmt: skip


app = _typer("A local-first sync node: encrypted local stores, CRDT sync between a user's devices.", no_args_is_help=True)
pref_app = _typer("Preferences: last writer wins per key.", no_args_is_help=True)
msg_app = _typer("Conversation messages.", no_args_is_help=True)
memory_app = _typer("Memories and semantic search.", no_args_is_help=True)
note_app = _typer("Relationship notes and profile texts.", no_args_is_help=True)
analytics_app = _typer("Analytics over conversations.", no_args_is_help=True)
devices_app = _typer("This user's devices.", invoke_without_command=True)
pair_app = _typer("Pair a new device with this user's group.", no_args_is_help=True)
for sub_app, name in (
    (pref_app, "pref"), (msg_app, "msg"), (memory_app, "memory"), (note_app, "note"),
    (analytics_app, "analytics"), (devices_app, "devices"), (pair_app, "pair"),
):  # fmt: skip
    app.add_typer(sub_app, name=name)
# Soft wrapping: rich otherwise breaks lines at the terminal's width, or at 80 columns when not in a terminal, which
# splits multiaddrs and ids; a terminal wraps a long line by itself and copying it gives it back whole.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
T = TypeVar("T")
PASSPHRASE_ENV = "AICO_PASSPHRASE"
HOME_ENV = "AICO_HOME"


def default_home() -> Path:
    """Return the platform's user data folder for the node."""
    if HOME_ENV in os.environ:
        return Path(os.environ[HOME_ENV])
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "aico-node"


@attrs.define
class Settings:
    """What the global options set for this run of the command line."""

    debug: bool = False


settings = Settings()


@app.callback()
def main_options(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option("--home", metavar="DIR", help="Node home folder (default: AICO_HOME or the user data folder)."),
    ] = None,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            show_default=False,
            help=f"Log more: -v info, -vv debug (default: {LOG_ENV} or warnings only).",
        ),
    ] = 0,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
) -> None:
    """A local-first sync node: encrypted local stores, CRDT sync between a user's devices."""
    settings.debug = debug
    try:
        configure_logging(level_from(verbose, os.environ.get(LOG_ENV)))
    except LogLevelError as error:
        raise typer.BadParameter(str(error)) from None
    ctx.obj = home or default_home()


def home_of(ctx: typer.Context) -> Path:
    return ctx.find_root().obj


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `message` as an error and return the exit to raise (1: the operation was refused)."""
    if settings.debug and sys.exc_info()[1] is not None:
        traceback.print_exc()
    console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


def print_lines(lines: list[str]) -> None:
    """Print lines of human output as they are: no markup, no highlighting, no wrapping."""
    print("\n".join(lines), flush=True)


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
    """Run a data command on the running node through its socket, or, with no node, on the stores directly."""
    return call_where(home, method, **params)[0]


def call_where(home: Path, method: str, **params: Any) -> tuple[Any, bool]:
    """Run a data command as `call` does; also say whether a running node answered (else the stores did). While a
    node starts (it holds the home, its socket is not up yet) wait for its socket instead of opening the stores."""
    secret: str | None = None
    while True:
        answered, result = call_node(home, method, params)
        if answered:
            return result, True
        secret = secret or passphrase()
        done, result = run_async(functools.partial(_call_directly, home, secret, method, params))
        if done:
            return result, False
        # A node took the home between the look and the opening: ask it.


def _call_timeout_s(method: str) -> float:
    from node.api.handlers import HANDLER_TIMEOUTS_S
    from node.api.rpc import REQUEST_TIMEOUT_S

    return HANDLER_TIMEOUTS_S.get(method, REQUEST_TIMEOUT_S) + RESPONSE_MARGIN_S


def node_client(home: Path, timeout_s: float) -> Any:
    """An RpcClient connected to the node running on `home`, or None when no node holds it; waits (bounded) for the
    socket of a node that is starting."""
    from node.api.rpc import NodeNotRunning, RpcClient, RpcError
    from node.home import NODE_HOLDER, HomeLock, socket_path

    deadline = time.monotonic() + NODE_START_WAIT_S
    while True:
        try:
            return RpcClient.connect(socket_path(home), timeout_s=timeout_s)
        except NodeNotRunning:
            pass
        except RpcError as error:
            raise fail(str(error)) from None
        lock = HomeLock(home)
        holder = lock.holder()
        if not lock.node_starting() and (holder is None or NODE_HOLDER not in holder):
            return None
        if time.monotonic() > deadline:
            raise fail(f"{home} is held by a node whose socket did not open within {NODE_START_WAIT_S:.0f} s")
        time.sleep(SOCKET_POLL_S)


def call_node(home: Path, method: str, params: dict[str, Any]) -> tuple[bool, Any]:
    """(True, the result) of a data command run by the node on `home`, or (False, None) when no node holds it. A call
    that timed out is sent again on a new connection (a timeout closes the old one) with the same key, so the node
    runs it once; the node's refusals end the command as clear exits."""
    from node.api.rpc import INTERNAL, RpcError, RpcRemoteError, RpcTimeoutError

    key = secrets.token_hex(16)
    timeout_s = _call_timeout_s(method)
    for retries_left in reversed(range(CALL_RETRIES + 1)):
        client = node_client(home, timeout_s)
        if client is None:
            return False, None
        with client:
            try:
                return True, client.call_keyed(method, params, key)
            except RpcTimeoutError as error:
                if retries_left == 0:
                    raise fail(f"{error}; it may still finish") from None
            except RpcRemoteError as error:
                if error.type == INTERNAL:
                    raise fail(f"the node failed: {error.message} (its log has the traceback)") from None
                raise fail(error.message) from None
            except RpcError as error:
                raise fail(str(error)) from None
    raise AssertionError("unreachable: the last attempt returns or raises")


@contextlib.asynccontextmanager
async def node_session(
    home: Path, method: str, holder: str, on_stores: Callable[[Any, dict[str, Any]], Awaitable[Any]] | None = None
) -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Any]]]:
    """Yield a way to run `method` many times: on the running node through one socket, or with no node running, on
    the stores opened once for the block (as `holder`), by `on_stores(node, params)` if given."""
    probe = node_client(home, _call_timeout_s(method))
    if probe is not None:
        probe.close()

        async def over_socket(params: dict[str, Any]) -> Any:
            answered, result = await trio.to_thread.run_sync(call_node, home, method, params)
            if not answered:
                raise fail("the node stopped meanwhile; run the same command again")
            return result

        yield over_socket
        return
    from node.app import Node

    async with Node.opened(home, passphrase(), holder) as node:
        run = on_stores or (lambda node, params: node.handlers[method](params))

        async def in_process(params: dict[str, Any]) -> Any:
            return await run(node, params)

        yield in_process


async def _call_directly(home: Path, secret: str, method: str, params: dict[str, Any]) -> tuple[bool, Any]:
    """(True, the result) of a data command run on the stores; (False, None) if a node took the home meanwhile."""
    from node.app import Node
    from node.home import HomeBusy

    try:
        async with Node.opened(home, secret, f"aico-node {method}") as node:
            return True, await node.handlers[method](params)
    except HomeBusy as busy:
        if busy.by_node:
            return False, None
        raise HomeBusy(home, f"{busy.holder}; try again when it is done") from None


def user_facing_errors() -> tuple[type[Exception], ...]:
    """The roots of the errors that explain themselves: shown as one line, never as a traceback.

    Imported when an error is handled: the packages that define them import libp2p, the stores and zeroconf, a
    second of start-up every command would pay, a usage error included.
    """
    from discovery.errors import DiscoveryError
    from framing import ProtocolError
    from node.errors import NodeError
    from p2p.errors import P2pError
    from relay.errors import RelayError
    from stores.errors import StoreError

    return (NodeError, StoreError, ProtocolError, RelayError, P2pError, DiscoveryError)


def run_async(async_fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async function, turning the node's and the stores' errors into clear messages."""
    try:
        return trio.run(async_fn)
    except user_facing_errors() as error:
        raise fail(str(error)) from None
    except BaseExceptionGroup as group:
        # An error inside a nursery arrives in a group, beside the cancellations it caused: act on the first one.
        if (interrupt := first_of(group, (KeyboardInterrupt,))) is not None:
            raise interrupt from None
        if (exit_ := first_of(group, (typer.Exit,))) is not None:
            raise exit_ from None
        if (explained := first_of(group, user_facing_errors())) is not None:
            raise fail(str(explained)) from None
        raise


def first_of(error: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of `types` that is `error` or is in it (a group, possibly nested), or None."""
    if isinstance(error, types):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := first_of(inner, types)) is not None:
                return found
    return None


def json_value(text: str) -> Any:
    """Parse a command-line value as JSON if it is JSON, else keep it as text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def print_json(value: Any) -> None:
    print(json.dumps(value, default=str), flush=True)


def print_result(value: T, *, as_json: bool, lines: Callable[[T], list[str]]) -> None:
    """Print a command's result as JSON when asked, else as the lines `lines` makes of it for people."""
    if as_json:
        print_json(value)
    else:
        print_lines(lines(value))

