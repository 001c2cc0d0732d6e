"""Serving the page: a loopback socket, Starlette on Hypercorn's trio worker, in the node's own event loop."""

import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from node.gui.address import GuiAddress, bind
from node.gui.guard import Gatekeeper
from node.gui.live import InviteSlot, LiveFeed, NodeView, page_state
from node.gui.web import make_app

log = logging.getLogger(__name__)
HEADER_BYTES_MAX = 16 * 1024
KEEP_ALIVE_S = 5.0  # also how long a connection may take to send its request's headers
BACKLOG = 32
GRACEFUL_STOP_S = 1.0


@attrs.frozen
class GuiServer:
    """A page being served: where, its `gui.login` handler, and its section of `status`."""

    url: str
    gate: Gatekeeper
    clock: Callable[[], float] = time.monotonic

    async def login(self, params: dict) -> dict:
        """The `gui.login` handler: the page's URL with a new one-time login token."""
        return {"url": f"{self.url}login?token={self.gate.issue_login_token(self.clock())}"}

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "sessions": self.gate.sessions, "refused": dict(self.gate.refused)}


async def serve_gui(
    node: NodeView, address: GuiAddress, *, task_status: trio.TaskStatus[GuiServer] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the page on `address` until cancelled; started() with the GuiServer. A port in use raises GuiError
    before anything starts."""
    sock = bind(address)
    host = address.host_header(sock.getsockname()[1])
    gate = Gatekeeper(host)
    config = Config()
    # Hypercorn takes over the socket (and closes it) through its file descriptor.
    config.bind = [f"fd://{sock.detach()}"]
    config.backlog = BACKLOG
    config.h11_max_incomplete_size = HEADER_BYTES_MAX
    config.keep_alive_timeout = KEEP_ALIVE_S
    config.graceful_timeout = GRACEFUL_STOP_S
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("node.gui.http")
    config.loglevel = "WARNING"
    started = False
    try:
        async with trio.open_nursery() as nursery:
            live = LiveFeed(node, lambda: page_state(node, invite.view))
            invite = InviteSlot(node, nursery, live.poke)
            await nursery.start(live.run)
            await nursery.start(serve, make_app(node, gate, live, invite), config)
            task_status.started(GuiServer(f"http://{host}/", gate))
            started = True
    except* Exception as failure:
        if not started:
            raise
        # A page that breaks must not take the node down with it.
        log.error("the local page stopped", exc_info=failure)
