"""The `aico-node` command line."""

import gc
import getpass
import importlib
import json
import os
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import trio
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

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
PASSPHRASE_ENV = "AICO_PASSPHRASE"
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
    home: Annotated[Optional[Path], typer.Option("--home", help="Node home folder (default: AICO_HOME or the user data folder).")] = None,
) -> None:
    """A local-first sync node: encrypted local stores, CRDT sync between a user's devices."""
    ctx.obj = home or default_home()


def _home(ctx: typer.Context) -> Path:
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


def call(home: Path, method: str, **params: Any) -> Any:
    """Run a data command on the running node through its socket, or on the stores directly."""
    from node.app import Node, socket_path
    from node.rpc import NodeNotRunning, RpcClient, RpcRemoteError

    try:
        with RpcClient.connect(socket_path(home)) as client:
            return client.call(method, **params)
    except NodeNotRunning:
        pass
    except RpcRemoteError as error:
        raise fail(str(error)) from None
    secret = passphrase()

    async def direct() -> Any:
        async with Node.opened(home, secret) as node:
            return await node.handlers[method](params)

    return _run(direct)


def _run(async_fn) -> Any:
    """Run an async function, turning the node's and the stores' errors into clear messages."""
    from node.errors import NodeError
    from stores.errors import StoreError

    try:
        return trio.run(async_fn)
    except (NodeError, StoreError) as error:
        raise fail(str(error)) from None


def _json_value(text: str) -> Any:
    """Parse a command-line value as JSON if it is JSON, else keep it as text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _embedding(path: Optional[Path]) -> Optional[list[float]]:
    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False).astype(float).reshape(-1).tolist()
    except (OSError, ValueError) as error:
        raise fail(f"cannot read embedding {path}: {error}") from None


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=str))


# -- node lifecycle ---------------------------------------------------------------------------------


@app.command()
def init(
    ctx: typer.Context,
    engine: Annotated[str, typer.Option(help="Primary SQL engine: sqlcipher or libsql.")] = "sqlcipher",
) -> None:
    """Create this device's identity, keys and encrypted stores."""
    from node.app import init_home
    from stores.datalayer import StoreConfig

    home = _home(ctx)
    secret = passphrase(confirm=True)
    identity = _run(lambda: init_home(home, secret, StoreConfig(engine=engine)))
    out.print(f"initialised {home} for device {identity.device_id}")


ListenOption = Annotated[list[str], typer.Option("--listen", help="Multiaddr to listen on (repeatable).")]
PeerOption = Annotated[list[str], typer.Option("--peer", help="Multiaddr of a device to keep syncing with (repeatable).")]
NoMdnsOption = Annotated[bool, typer.Option("--no-mdns", help="Do not look for devices on the LAN with mDNS.")]
RelayOption = Annotated[
    Optional[str],
    typer.Option("--relay", help="Multiaddr (ending in /p2p/<id>) of a relay: reach devices through it, and its mailbox."),
]


def _network(listen: list[str], peer: list[str], no_mdns: bool, relay: str | None = None):
    from node.app import NetworkOptions

    listen_addrs = tuple(listen) or NetworkOptions().listen
    return NetworkOptions(listen=listen_addrs, peers=tuple(peer), mdns=not no_mdns, relay=relay)


GC_GEN0_THRESHOLD = 50_000  # allocations between young collections; CPython's default of 700 suits small heaps
GIL_SWITCH_INTERVAL_S = 0.0005  # how long a thread waiting for the GIL lets the holder run; CPython's default is 5 ms


def _tune_interpreter() -> None:
    """Keep the garbage collector and the GIL off the hot path of a long-running node with a large heap.

    Set before the stores load: measured on a start with 100k messages, collections at the default thresholds took
    0.56 s of the start (six full ones walking the replica being built), 0.14-0.2 s with these. On a 100k-op
    catch-up they walked the replica's objects again and again (catch-up 4.2-4.8 s, 2.9-3.4 s with these and the
    freeze after start-up).

    The store's worker thread gives up the GIL for every SQL statement, and retaking it waits for the switch
    interval while the event loop runs Python. Measured: a store write of 100k ops in groups of 10k beside a busy
    thread ran at 52k ops/s with the default 5 ms interval, 155k ops/s with 0.5 ms (186k alone).
    """
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 100)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


async def _serve_until_signal(node, network, gui_address) -> None:
    from node.app import socket_path

    async with trio.open_nursery() as nursery:
        await nursery.start(node.serve, network)
        if gui_address is None:
            node.status_sections["gui"] = lambda: None
        else:
            await _start_gui(nursery, node, gui_address)
        ready = {"ready": True, "device_id": node.identity.device_id, "socket": str(socket_path(node.home))}
        ready["addresses"] = node.host.addresses if node.host else []
        ready["gui"] = node.status_sections["gui"]()
        # What start-up built (imports, the replica loaded from the store) lives as long as the node: frozen, no full
        # collection walks it again.
        gc.freeze()
        print(json.dumps(ready), flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        console.print("stopping: draining the projector and closing the stores")
        nursery.cancel_scope.cancel()


async def _start_gui(nursery: trio.Nursery, node, address) -> None:
    """Serve the local page beside the node and add its `gui.login` handler and `gui` status; a port in use is
    a one-line warning, and the node runs on without the page."""
    from node.gui.errors import GuiError
    from node.gui.server import serve_gui

    try:
        gui = await nursery.start(serve_gui, node, address)
    except GuiError as error:
        refusal = {"url": None, "error": str(error)}
        message = f"[yellow]warning:[/yellow] the node runs without its local page: {escape(refusal['error'])}"
        console.print(message, soft_wrap=True)
        node.status_sections["gui"] = lambda: refusal
        return
    node.handlers["gui.login"] = gui.login
    node.status_sections["gui"] = gui.status


GuiOption = Annotated[
    Optional[str], typer.Option("--gui", help="Loopback HOST:PORT of the local page (default 127.0.0.1:8395).")
]
NoGuiOption = Annotated[bool, typer.Option("--no-gui", help="Do not serve the local page.")]


def _import_in_background(*modules: str) -> None:
    # libp2p takes ~0.7 s to import, the page's web stack ~0.15 s; doing it on another thread overlaps it with loading
    # the stores, whose SQL reads release the GIL. The later imports wait for this one.
    def imports() -> None:
        for module in modules:
            importlib.import_module(module)

    threading.Thread(target=imports, daemon=True).start()


@app.command()
def run(
    ctx: typer.Context,
    listen: ListenOption = [],
    peer: PeerOption = [],
    no_mdns: NoMdnsOption = False,
    relay: RelayOption = None,
    gui: GuiOption = None,
    no_gui: NoGuiOption = False,
) -> None:
    """Run the node until SIGINT or SIGTERM (a first run initialises the home)."""
    from node.app import Node, init_home, is_initialised
    from node.gui.address import DEFAULT_ADDRESS, GuiAddress
    from node.gui.errors import GuiError
    from stores.datalayer import StoreConfig

    if gui is not None and no_gui:
        raise typer.BadParameter("give --gui ADDR or --no-gui, not both")
    try:
        gui_address = None if no_gui else GuiAddress.parse(gui or DEFAULT_ADDRESS)
    except GuiError as error:
        raise typer.BadParameter(str(error)) from None
    home = _home(ctx)
    fresh = not is_initialised(home)
    secret = passphrase(confirm=fresh)
    network = _network(listen, peer, no_mdns, relay)
    _tune_interpreter()
    _import_in_background("node.p2p", *(() if no_gui else ("node.gui.server",)))

    async def serve() -> None:
        if fresh:
            await init_home(home, secret, StoreConfig())
        async with Node.opened(home, secret) as node:
            await _serve_until_signal(node, network, gui_address)

    _run(serve)


@app.command("gui")
def gui_command(
    ctx: typer.Context,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")] = False,
) -> None:
    """Print the running node's local page address with a one-time login token (valid 2 minutes, used once)."""
    import webbrowser

    from node.app import socket_path
    from node.rpc import UNKNOWN_METHOD, NodeNotRunning, RpcClient, RpcRemoteError

    try:
        with RpcClient.connect(socket_path(_home(ctx))) as client:
            url = client.call("gui.login")["url"]
    except NodeNotRunning:
        raise fail("the page is served by the running node: start it with `aico-node run`") from None
    except RpcRemoteError as error:
        if error.type == UNKNOWN_METHOD:
            raise fail("the running node serves no page (started with --no-gui, or its port was taken: "
                       "see `aico-node status`)") from None  # fmt: skip
        raise fail(str(error)) from None
    print(url, flush=True)
    if open_browser and not webbrowser.open(url):
        raise fail("no browser could be opened; open the address above by hand")


@app.command("relay")
def relay_command(
    listen: ListenOption = [],
    data: Annotated[Optional[Path], typer.Option(help="Folder for the relay's key and mailbox store.")] = None,
) -> None:
    """Run a relay: circuits between devices that cannot dial each other, and a mailbox of sealed batches."""
    from relay import RelayError
    from relay.server import RELAY_LISTEN, run_relay

    folder = data or default_home().parent / "aico-relay"
    try:
        _run(lambda: run_relay(list(listen) or list(RELAY_LISTEN), folder))
    except RelayError as error:
        raise fail(str(error)) from None


@pair_app.command("invite")
def pair_invite(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of the code and a QR code.")] = False,
    ttl_s: Annotated[float, typer.Option("--ttl", min=30, max=3600, help="Seconds the invite stays open.")] = 600,
) -> None:
    """Open a one-time invite on the running node, print its code, and wait for the new device to join."""
    from node.app import socket_path
    from node.rpc import NodeNotRunning, RpcClient, RpcRemoteError

    try:
        with RpcClient.connect(socket_path(_home(ctx)), timeout_s=ttl_s + 30) as client:
            for update in client.stream("pair.invite", ttl_s=ttl_s):
                if as_json:
                    print(json.dumps(update), flush=True)
                elif "code" in update:
                    _show_invite(update)
                elif "refused" in update:
                    console.print(f"a join attempt was refused ({update['refused']}); {update['attempts_left']} left")
                if "paired" in update:
                    console.print(f"[green]paired[/green] with {update['paired']}")
                    return
            raise fail("the invite expired or ran out of attempts")
    except NodeNotRunning:
        raise fail("pairing needs the running node: start it with `aico-node run`") from None
    except RpcRemoteError as error:
        raise fail(str(error)) from None


def _show_invite(invite: dict) -> None:
    import segno

    from node.pairing import invite_payload

    payload = invite_payload(invite["code"], invite["addresses"])
    segno.make(payload, error="l").terminal(compact=True)
    out.print(f"code: [bold]{invite['code']}[/bold]")
    for address in json.loads(payload)["addresses"]:
        out.print(f"  aico-node pair join {invite['code']} --address {address}")


@pair_app.command("join")
def pair_join(
    ctx: typer.Context,
    code: str,
    address: Annotated[str, typer.Option("--address", help="Multiaddr of the inviting device (from its invite).")],
    listen: ListenOption = [],
    sync_timeout_s: Annotated[float, typer.Option("--sync-timeout", min=1, help="Seconds to wait for the first full sync.")] = 600,
) -> None:
    """Join this user's group: pair with the inviting device using CODE, then sync everything from it."""
    from node.app import Node, identity_for_joining, init_joined_home
    from node.identity import IDENTITY_FILE
    from node.p2p import p2p_host
    from node.pair_service import join
    from stores.datalayer import StoreConfig

    home = _home(ctx)
    secret = passphrase(confirm=not (home / IDENTITY_FILE).exists())

    async def pair_and_sync() -> None:
        identity = identity_for_joining(home, secret)
        async with p2p_host(identity, tuple(listen) or ("/ip4/127.0.0.1/tcp/0",)) as host:
            paired = await join(host, identity, code, address)
        await init_joined_home(home, identity, paired, StoreConfig())
        console.print(f"[green]enrolled[/green] as {identity.device_id}; syncing from {paired.peer_device_id}")
        network = _network(listen, [address], no_mdns=True)
        async with Node.opened(home, secret) as node:
            async with trio.open_nursery() as nursery:
                await nursery.start(node.serve, network)
                await _first_sync(node, paired.peer_device_id, sync_timeout_s)
                nursery.cancel_scope.cancel()

    _run(pair_and_sync)


async def _first_sync(node, inviter: str, timeout_s: float) -> None:
    """Wait, with a progress bar, until this node holds everything the inviter had when they connected."""
    from rich.progress import Progress

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("syncing", total=None)
        with trio.move_on_after(timeout_s) as waited:
            while True:
                peer = node.sync.peers.get(inviter)
                if peer is not None and peer.session is not None and peer.session.peer_device == inviter:
                    behind, _ = peer.behind(node.data.replica)
                    have = node.data.replica.vector.total()
                    progress.update(task, total=have + behind, completed=have)
                    if behind == 0:
                        break
                await trio.sleep(0.05)
    if waited.cancelled_caught:
        raise fail(f"enrolled, but the first sync did not finish within {timeout_s} s; `aico-node run` will resume it")
    console.print(f"synced {node.data.replica.vector.total()} ops")


@app.command()
def status(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show this device, its stores and its peers."""
    result = call(_home(ctx), "status")
    if as_json:
        _print_json(result)
    else:
        for key, value in result.items():
            out.print(f"{key}: {value}")


@app.command()
def digest(ctx: typer.Context) -> None:
    """Print the sha256 and counts of the synced state (equal on two devices exactly when they agree)."""
    _print_json(call(_home(ctx), "digest"))


@app.command()
def conflicts(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=100_000)] = 100) -> None:
    """List concurrent values that lost a last-writer-wins merge, newest first."""
    rows = call(_home(ctx), "conflicts", limit=limit)
    table = Table("collection", "key", "field", "kept", "lost", "lost from")
    for row in rows:
        table.add_row(row["collection"], row["key"], str(row["field"] or ""), repr(row["winner_value"]),
                      repr(row["loser_value"]), f"{row['loser_device'][:16]}:{row['loser_seq']}")  # fmt: skip
    out.print(table if rows else "no conflicts")


@app.command()
def rebuild(ctx: typer.Context) -> None:
    """Regenerate every derived store (DuckDB, Chroma, cache) from the primary store."""
    _print_json(call(_home(ctx), "rebuild"))


@app.command()
def forget(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help="message or memory")],
    item_id: Annotated[str, typer.Argument(metavar="ID")],
) -> None:
    """Delete a message or memory from every store and every device."""
    if kind not in ("message", "memory"):
        raise typer.BadParameter("kind must be message or memory")
    _print_json(call(_home(ctx), "forget", kind=kind, id=item_id))


@pref_app.command("set")
def pref_set(ctx: typer.Context, key: str, value: str) -> None:
    """Set a preference (VALUE is parsed as JSON when it is JSON)."""
    _print_json(call(_home(ctx), "pref.set", key=key, value=_json_value(value)))


@pref_app.command("get")
def pref_get(ctx: typer.Context, key: str) -> None:
    """Print a preference as JSON (null when unset)."""
    _print_json(call(_home(ctx), "pref.get", key=key))


@msg_app.command("add")
def msg_add(
    ctx: typer.Context,
    conversation: str,
    text: str,
    role: Annotated[str, typer.Option()] = "user",
    sentiment: Annotated[Optional[float], typer.Option(min=-1.0, max=1.0)] = None,
    response_time_ms: Annotated[Optional[float], typer.Option(min=0)] = None,
) -> None:
    """Add a message to a conversation and print its id."""
    _print_json(call(_home(ctx), "msg.add", conversation=conversation, text=text, role=role,
                     sentiment=sentiment, response_time_ms=response_time_ms))  # fmt: skip


@memory_app.command("add")
def memory_add(
    ctx: typer.Context,
    text: str,
    embedding: Annotated[Optional[Path], typer.Option(help="A .npy file with the memory's embedding.")] = None,
    metadata: Annotated[Optional[str], typer.Option(help="Metadata as a JSON object.")] = None,
) -> None:
    """Store a memory and print its id."""
    meta = _json_value(metadata) if metadata else {}
    if not isinstance(meta, dict):
        raise typer.BadParameter("metadata must be a JSON object")
    _print_json(call(_home(ctx), "memory.add", text=text, embedding=_embedding(embedding), metadata=meta))


@memory_app.command("search")
def memory_search(
    ctx: typer.Context,
    text: Annotated[Optional[str], typer.Argument()] = None,
    embedding: Annotated[Optional[Path], typer.Option(help="A .npy file with the query embedding.")] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=1000)] = 5,
    where: Annotated[Optional[str], typer.Option(help="Metadata filter as a JSON object.")] = None,
) -> None:
    """Print the memories nearest a text or an embedding, one per near-duplicate group."""
    if (text is None) == (embedding is None):
        raise typer.BadParameter("give either TEXT or --embedding")
    _print_json(call(_home(ctx), "memory.search", text=text, embedding=_embedding(embedding), k=k,
                     where=_json_value(where) if where else None))  # fmt: skip


@note_app.command("edit")
def note_edit(ctx: typer.Context, name: str, text: str) -> None:
    """Set a note's text (merged character-wise with edits made elsewhere)."""
    _print_json(call(_home(ctx), "note.edit", name=name, text=text))


@note_app.command("show")
def note_show(ctx: typer.Context, name: str) -> None:
    """Print a note's text."""
    text = call(_home(ctx), "note.show", name=name)
    if text is None:
        raise fail(f"no note named {name}")
    print(text)


@analytics_app.command("daily")
def analytics_daily(ctx: typer.Context, days: Annotated[int, typer.Option(min=1, max=3660)] = 30) -> None:
    """Per day: message count, average sentiment, p95 response time (newest first)."""
    _print_json(call(_home(ctx), "analytics.daily", days=days))


@devices_app.callback()
def devices(ctx: typer.Context) -> None:
    """List this user's devices."""
    if ctx.invoked_subcommand is None:
        _print_json(call(_home(ctx), "devices.list"))


@devices_app.command("revoke")
def devices_revoke(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="The device id to cut off for good.")],
    reason: Annotated[str, typer.Option(help="Why, kept in the registry.")] = "",
) -> None:
    """Revoke a device for good and rotate the group key so it reads nothing written from now on."""
    _print_json(call(_home(ctx), "devices.revoke", device=device, reason=reason))


def _parse_faults(faults: str) -> frozenset[str]:
    from simulations import FAULT_NAMES

    chosen = frozenset(f.strip() for f in faults.split(",") if f.strip())
    unknown = chosen - set(FAULT_NAMES)
    if unknown:
        raise typer.BadParameter(f"unknown {', '.join(sorted(unknown))}; choose from {', '.join(FAULT_NAMES)}")
    return chosen


@app.command()
def simulate(
    nodes: Annotated[int, typer.Option(min=2, max=64, help="Number of simulated devices.")] = 4,
    ops: Annotated[int, typer.Option(min=0, max=1_000_000, help="Local writes in total, over all devices.")] = 1000,
    seed: Annotated[Optional[int], typer.Option(help="RNG seed; default SIM_SEED or a random one.")] = None,
    faults: Annotated[str, typer.Option(help="Comma-separated: partition,drop,dup,reorder,delay,restart,oneway,hold.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Run a deterministic multi-node sync simulation; the same seed replays the same run."""
    from simulations import SimConfig, simulate as run_simulation

    if seed is None:
        seed = int(os.environ["SIM_SEED"]) if "SIM_SEED" in os.environ else random.SystemRandom().randrange(1 << 32)
    config = SimConfig(nodes=nodes, ops=ops, seed=seed, faults=_parse_faults(faults))
    with console.status(f"simulating {nodes} nodes, {ops} ops, seed {seed} ..."):
        report = run_simulation(config)
    if as_json:
        print(json.dumps(report.to_json()))
    else:
        table = Table(title="simulation", show_header=False)
        for key, value in report.to_json().items():
            if key != "digests":
                table.add_row(key, str(value))
        table.add_row("distinct digests", str(len(set(report.digests))))
        Console().print(table)
    if not report.converged:
        console.print(f"[red]did not converge[/red]; replay with SIM_SEED={seed} or --seed {seed}")
        raise typer.Exit(1)


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="Which benchmark: crdt, stores, sync or relay.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Run a benchmark; every figure is printed beside a baseline measured in the same run."""
    from simulations.bench import BENCHES, run_bench

    if name not in BENCHES:
        raise typer.BadParameter(f"unknown benchmark {name!r}; choose from {', '.join(sorted(BENCHES))}")
    with console.status(f"running benchmark {name} ..."):
        report = run_bench(name)
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"bench {name}")
    for column in ("name", "value", "unit", "baseline", "ratio", "target", "met"):
        table.add_column(column)
    for row in report["metrics"]:
        table.add_row(*(str(row[c]) for c in ("name", "value", "unit", "baseline", "ratio", "target", "met")))
    Console().print(table)


def main() -> None:
    os.umask(0o077)  # every file the node writes in its home is the owner's alone
    app()
