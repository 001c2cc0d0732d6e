"""Commands that make, run and pair a node, and run a relay."""

import functools
import gc
import importlib
import json
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import trio
import typer
from rich.markup import escape

import cli.checks as checks
import cli.show as show
from cli.common import app, console, default_home, fail, home_of, out, pair_app, passphrase, run_async
from framing import LocalProtocolError


@app.command()
def init(
    ctx: typer.Context,
    engine: Annotated[
        str, typer.Option(parser=checks.sql_engine, metavar="sqlcipher|libsql", help="Primary SQL engine.")
    ] = "sqlcipher",
    name: Annotated[
        str | None,
        typer.Option("--name", metavar="NAME", help="This device's name, shown on every device (default: host name)."),
    ] = None,
) -> None:
    """Create this device's identity, keys and encrypted stores."""
    from node.home import init_home
    from stores.datalayer import StoreConfig

    home = home_of(ctx)
    device_name = _device_name(name)
    secret = passphrase(confirm=True)
    identity = run_async(lambda: init_home(home, secret, StoreConfig(engine=engine), device_name))
    out.print(f"initialised {home} for device {device_name} ({identity.device_id})", soft_wrap=True)


ListenOption = Annotated[
    list[str],
    typer.Option(
        "--listen", parser=checks.listen_address, metavar="MADDR", help="TCP multiaddr to listen on (repeatable)."
    ),
]
PeerOption = Annotated[
    list[str],
    typer.Option(
        "--peer",
        parser=checks.peer_address,
        metavar="MADDR",
        help="Multiaddr, ending in /p2p/<peer id>, of a device to keep syncing with (repeatable).",
    ),
]
NoMdnsOption = Annotated[bool, typer.Option("--no-mdns", help="Do not look for devices on the LAN with mDNS.")]
RelayOption = Annotated[
    list[str],
    typer.Option(
        "--relay",
        parser=checks.relay_address,
        metavar="MADDR",
        help="Multiaddr (ending in /p2p/<id>) of a relay: reach devices through it, and its mailbox (repeatable: "
        "relays of one fleet, the next used when one cannot be reached).",
    ),
]


def _network(listen: list[str], peer: list[str], no_mdns: bool, relays: list[str] = []) -> Any:
    from node.net.network import NetworkOptions

    listen_addrs = tuple(listen) or None
    return NetworkOptions(listen=listen_addrs, peers=tuple(peer), mdns=not no_mdns, relays=tuple(relays))


GC_GEN0_THRESHOLD = 50_000  # allocations between young collections; CPython's default of 700 suits small heaps
GIL_SWITCH_INTERVAL_S = 0.0005  # how long a thread waiting for the GIL lets the holder run; CPython's default is 5 ms


def tune_interpreter() -> None:
    """Keep the garbage collector and the GIL off the hot path of a process with a large heap: a running node, and
    every command that loads the replica (a `pair join` of 1M ops took 71 s with CPython's defaults).

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


async def _serve_until_signal(node: Any, network: Any, gui_address: Any) -> None:
    from node.home import socket_path

    async with trio.open_nursery() as nursery:
        await nursery.start(node.serve, network)
        if gui_address is None:
            node.status_sections["gui"] = lambda: None
        else:
            await _start_gui(nursery, node, gui_address)
        ready = {"ready": True, "device_id": node.identity.device_id, "socket": str(socket_path(node.home))}
        ready["addresses"] = node.network.host.addresses if node.network else []
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


async def _start_gui(nursery: trio.Nursery, node: Any, address: Any) -> None:
    """Serve the local page beside the node and add its `gui.login` handler and `gui` status; a port in use is
    a one-line warning, and the node runs on without the page."""
    from node.gui.errors import GuiError
    from node.gui.server import serve_gui

    try:
        gui = await nursery.start(serve_gui, node, address)
    except GuiError as error:
        refusal = {"url": None, "error": str(error)}
        message = f"[yellow]warning:[/yellow] the node runs without its local page: {escape(str(error))}"
        console.print(message, soft_wrap=True)
        node.status_sections["gui"] = lambda: refusal
        return
    node.handlers["gui.login"] = gui.login
    node.status_sections["gui"] = gui.status


GuiOption = Annotated[
    str | None,
    typer.Option("--gui", metavar="HOST:PORT", help="Loopback address of the local page (default 127.0.0.1:8395)."),
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
    relay: RelayOption = [],
    gui: GuiOption = None,
    no_gui: NoGuiOption = False,
) -> None:
    """Run the node until SIGINT or SIGTERM (a first run initialises the home)."""
    from node.gui.address import DEFAULT_ADDRESS, GuiAddress
    from node.gui.errors import GuiError
    from node.home import HomeLock, is_initialised

    if gui is not None and no_gui:
        raise typer.BadParameter("give --gui ADDR or --no-gui, not both")
    try:
        gui_address = None if no_gui else GuiAddress.parse(gui or DEFAULT_ADDRESS)
    except GuiError as error:
        raise typer.BadParameter(str(error)) from None
    home = home_of(ctx)
    fresh = not is_initialised(home)
    secret = passphrase(confirm=fresh)
    # Marked before the slow imports and the key's unlocking: a `status` typed meanwhile waits for this node's socket.
    with HomeLock(home).starting():
        _run(home, fresh, secret, functools.partial(_network, listen, peer, no_mdns, relay), gui_address)


def _run(home: Path, fresh: bool, secret: str, make_network: Callable[[], Any], gui_address: Any) -> None:
    from node.app import Node
    from node.home import NODE_HOLDER, init_home
    from stores.datalayer import StoreConfig

    network = make_network()
    _import_in_background("node.net.network", *(() if gui_address is None else ("node.gui.server",)))

    async def serve() -> None:
        if fresh:
            await init_home(home, secret, StoreConfig(), _device_name(None))
        async with Node.opened(home, secret, NODE_HOLDER) as node:
            await _serve_until_signal(node, network, gui_address)

    run_async(serve)


@app.command("gui")
def gui_command(
    ctx: typer.Context,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")] = False,
) -> None:
    """Print the running node's local page address with a one-time login token (valid 2 minutes, used once)."""
    import webbrowser

    from node.api.rpc import UNKNOWN_METHOD, NodeNotRunning, RpcClient, RpcRemoteError
    from node.home import socket_path

    try:
        with RpcClient.connect(socket_path(home_of(ctx))) as client:
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
    data: Annotated[Path | None, typer.Option(metavar="DIR", help="Folder for the relay's key and mailbox store.")] = None,
    mailbox_store: Annotated[
        str | None,
        typer.Option(
            metavar="URLS",
            help="nats:// URLs, comma-separated, of a JetStream cluster for the mailbox (default: SQLite).",
        ),
    ] = None,
) -> None:
    """Run a relay: circuits between devices that cannot dial each other, and a mailbox of sealed batches."""
    from relay.server import RELAY_LISTEN, run_relay

    folder = data or default_home().parent / "aico-relay"
    run_async(lambda: run_relay(list(listen) or list(RELAY_LISTEN), folder, mailbox_store=mailbox_store))


@pair_app.command("invite")
def pair_invite(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON lines instead of the code and a QR code.")
    ] = False,
    ttl_s: Annotated[float, typer.Option("--ttl", metavar="SECONDS", min=30, max=3600, help="Seconds the invite stays open.")] = 600,
) -> None:
    """Open a one-time invite on the running node, print its code, and wait for the new device to join."""
    from node.api.rpc import NodeNotRunning, RpcClient, RpcRemoteError
    from node.home import socket_path
    from node.trust.pairing import attempts_left_text

    try:
        with RpcClient.connect(socket_path(home_of(ctx)), timeout_s=ttl_s + 30) as client:
            for update in client.stream("pair.invite", ttl_s=ttl_s):
                if as_json:
                    print(json.dumps(update), flush=True)
                elif "code" in update:
                    _show_invite(update)
                elif "refused" in update:
                    reason = update["refused"].replace("_", " ")
                    console.print(f"a join attempt was refused ({reason}); {attempts_left_text(update['attempts_left'])}")
                if "paired" in update:
                    console.print(f"[green]paired[/green] with {show.device_label(update.get('name'), update['paired'])}")
                    return
            raise fail("the invite expired or ran out of attempts")
    except NodeNotRunning:
        raise fail("pairing needs the running node: start it with `aico-node run`") from None
    except RpcRemoteError as error:
        raise fail(str(error)) from None


def _show_invite(invite: dict) -> None:
    import segno

    from node.trust.pairing import invite_payload

    payload = invite_payload(invite["code"], invite["addresses"])
    segno.make(payload, error="l").terminal(compact=True)
    out.print(f"code: [bold]{invite['code']}[/bold]")
    for address in json.loads(payload)["addresses"]:
        out.print(f"  aico-node pair join {invite['code']} --address {address}")


@pair_app.command("join")
def pair_join(
    ctx: typer.Context,
    code: Annotated[
        str, typer.Argument(metavar="CODE", help="The invite's code (`pair invite` shows it), or its QR code's text.")
    ],
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            parser=checks.peer_address,
            metavar="MADDR",
            help="Multiaddr of the inviting device (from its invite); found on the LAN if omitted.",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", metavar="NAME", help="This device's name, shown on every device (default: host name)."),
    ] = None,
    listen: ListenOption = [],
    sync_timeout_s: Annotated[
        float, typer.Option("--sync-timeout", metavar="SECONDS", min=1, help="Seconds to wait for the first full sync.")
    ] = 600,
) -> None:
    """Join this user's group: pair with the inviting device using CODE, then sync everything from it."""
    from node.app import Node
    from node.home import NODE_HOLDER, HomeError, is_initialised
    from node.net.joining import join_group
    from node.trust.identity import IDENTITY_FILE
    from node.trust.pairing import PairingError, read_invite

    home = home_of(ctx)
    try:
        canonical, addresses = read_invite(code)
    except PairingError as error:
        raise typer.BadParameter(error.detail) from None
    device_name = _device_name(name)
    if is_initialised(home):
        raise fail(str(HomeError(f"{home} already belongs to a group; a device joins once, with a fresh home")))
    secret = passphrase(confirm=not (home / IDENTITY_FILE).exists())
    given = ([address] if address else []) + addresses

    async def pair_and_sync() -> None:
        joined = await join_group(home, secret, canonical, given, device_name, console.print)
        paired = joined.paired
        console.print(f"[green]enrolled[/green] as {device_name}; syncing from {paired.peer_device_id}", soft_wrap=True)
        network = _network(listen, [joined.address, *paired.inviter_addresses], no_mdns=True)
        async with Node.opened(home, secret, NODE_HOLDER) as node:
            async with trio.open_nursery() as nursery:
                # Analytics is loaded by the next `run`: filling it here, for this command's life, would slow the sync.
                await nursery.start(functools.partial(node.serve, load_analytics=False), network)
                await _first_sync(node, paired.peer_device_id, sync_timeout_s)
                nursery.cancel_scope.cancel()

    run_async(pair_and_sync)


def _device_name(name: str | None) -> str:
    """`name` (default: this machine's host name) if it can name a device; a usage error otherwise."""
    from node.trust.pairing import check_device_name

    try:
        return check_device_name(name or socket.gethostname() or "a device")
    except LocalProtocolError as error:
        raise typer.BadParameter(str(error)) from None


async def _first_sync(node: Any, inviter: str, timeout_s: float) -> None:
    """Wait, with a progress bar, until this node holds everything the inviter had when they connected."""
    from rich.progress import Progress

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("syncing", total=None)
        with trio.move_on_after(timeout_s) as waited:
            while True:
                peer = node.network.sync.peers.get(inviter)
                if node.data.state_progress is not None:  # the inviter's log was compacted: its state comes instead
                    done, total = node.data.state_progress
                    progress.update(task, description="receiving messages", total=total, completed=done)
                elif peer is not None and peer.session is not None and peer.session.peer_device == inviter:
                    behind, _ = peer.behind(node.data.replica)
                    have, stored = node.data.replica.vector.total(), node.data.ops_stored
                    progress.update(task, description="syncing", total=have + behind, completed=stored)
                    # Done once held on disk too: ops applied but not yet written would be lost when this command ends.
                    if behind == 0 and stored >= have:
                        break
                await trio.sleep(0.05)
    if waited.cancelled_caught:
        raise fail(f"enrolled, but the first sync did not finish within {timeout_s} s; `aico-node run` will resume it")
    console.print(f"synced {node.data.ops_stored} ops")
