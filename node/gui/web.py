"""The page's ASGI application: the guard every request passes (node/gui/guard.py), then the routes."""

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from importlib.resources import files
from urllib.parse import parse_qs

import trio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request, cookie_parser
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.gui.errors import GuiRequestError
from node.gui.guard import Gatekeeper, RateBucket, Session
from node.gui.live import InviteSlot, LiveFeed, NodeView, call

log = logging.getLogger(__name__)
BODY_BYTES_MAX = 4 * 1024
BODY_TIMEOUT_S = 10.0
QUERY_CHARS_MAX = 512
# Every request, and (separately) every failed login, spends a token of its bucket; beyond it the answer is 429.
REQUESTS_PER_S, REQUESTS_BURST = 20.0, 60
FAILED_LOGINS_PER_S, FAILED_LOGINS_BURST = 0.5, 5
SESSION_SCOPE_KEY = "aico.session"
LOGIN_COMMAND = "`aico-node gui`"
REVOKE_REASON = "revoked from the local page"
# Everything the page loads comes from the page itself: no other origin, no inline script or style, no framing.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
_SECURITY_HEADER_NAMES = {name for name, _ in SECURITY_HEADERS}
_INDEX = files("node.gui").joinpath("static", "index.html").read_bytes()


async def _plain(send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = (text + "\n").encode()
    start_headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": start_headers + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Lets a request through only if it names the bound address, is within the rate, and belongs to a logged-in
    session; a state-changing one must also come from the page's own origin with the session's CSRF token. Serves
    `/login`, which spends a one-time token for a session cookie. Adds the security headers to every response."""

    def __init__(self, app: ASGIApp, gate: Gatekeeper, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.gate = gate
        self.clock = clock
        self.requests = RateBucket(REQUESTS_PER_S, REQUESTS_BURST)
        self.failed_logins = RateBucket(FAILED_LOGINS_PER_S, FAILED_LOGINS_BURST)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # websockets: the page uses none
            await send({"type": "websocket.close", "code": 1008})
            return
        send = _with_security_headers(send)
        headers = Headers(scope=scope)
        method, now_s = scope["method"], self.clock()
        gate = self.gate
        if not gate.host_allowed(headers.get("host")):
            await self._refuse(send, "host", 421, f"this page answers only at {gate.origin}/")
            return
        if not self.requests.take(now_s):
            await self._refuse(send, "rate", 429, "too many requests; wait a moment")
            return
        if not gate.fetch_allowed(method, headers.get("sec-fetch-site"), headers.get("sec-fetch-mode")):
            await self._refuse(send, "origin", 403, "cross-origin request refused")
            return
        if scope["path"] == "/login":
            await self._log_in(scope, send, now_s)
            return
        session_id = cookie_parser(headers.get("cookie", "")).get(gate.cookie_name)
        session = gate.session(session_id, now_s)
        if session is None:
            await self._refuse(send, "session", 401, f"not logged in: open the link {LOGIN_COMMAND} prints")
            return
        if method not in ("GET", "HEAD"):
            if not gate.same_origin(headers.get("origin"), headers.get("sec-fetch-site")):
                await self._refuse(send, "origin", 403, "cross-origin request refused")
                return
            if not gate.csrf_ok(session, headers.get("x-csrf-token")):
                await self._refuse(send, "csrf", 403, "missing or wrong CSRF token; reload the page")
                return
        await self.app({**scope, SESSION_SCOPE_KEY: (session_id, session)}, receive, send)

    async def _refuse(self, send: Send, rule: str, status: int, text: str) -> None:
        self.gate.refused[rule] += 1
        await _plain(send, status, text)

    async def _log_in(self, scope: Scope, send: Send, now_s: float) -> None:
        if not self.failed_logins.available(now_s):
            await self._refuse(send, "rate", 429, "too many failed logins; wait a minute")
            return
        query = scope["query_string"].decode("latin-1")[:QUERY_CHARS_MAX]
        token = parse_qs(query).get("token", [""])[0]
        session_id = self.gate.log_in(token, now_s) if token else None
        if session_id is None:
            self.failed_logins.take(now_s)
            await self._refuse(send, "login", 401, f"this login link is wrong, used or expired: run {LOGIN_COMMAND}")
            return
        cookie = f"{self.gate.cookie_name}={session_id}; HttpOnly; SameSite=Strict; Path=/"
        await _plain(send, 303, "logged in", [(b"location", b"/"), (b"set-cookie", cookie.encode())])


def _with_security_headers(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            kept = [(name, value) for name, value in message.get("headers", []) if name not in _SECURITY_HEADER_NAMES]
            message = {**message, "headers": kept + SECURITY_HEADERS}
        await send(message)

    return sending


def _session(request: Request) -> tuple[str, Session]:
    return request.scope[SESSION_SCOPE_KEY]


async def _json_body(request: Request) -> dict:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise GuiRequestError("send JSON (content-type: application/json)", 415)
    with trio.move_on_after(BODY_TIMEOUT_S) as waited:
        body = await request.body()
    if waited.cancelled_caught:
        raise GuiRequestError(f"the request body did not arrive within {BODY_TIMEOUT_S} s", 408)
    try:
        value = json.loads(body)
    except ValueError:
        raise GuiRequestError("the request body is not JSON") from None
    if type(value) is not dict:
        raise GuiRequestError("the request body must be a JSON object")
    return value


def make_app(
    node: NodeView, gate: Gatekeeper, live: LiveFeed, invite: InviteSlot, clock: Callable[[], float] = time.monotonic
) -> ASGIApp:
    """The page: its HTML, scripts and styles from the package, its live state, and its few actions."""

    async def index(request: Request) -> Response:
        return Response(_INDEX, media_type="text/html; charset=utf-8")

    async def session_info(request: Request) -> Response:
        # The CSRF token is fetched by the page's script: never in the page source, unreadable from another origin.
        return JSONResponse({"csrf": _session(request)[1].csrf})

    async def events(request: Request) -> Response:
        session_id = _session(request)[0]
        updates = live.watch()
        first = await anext(updates)  # refuses before the response starts when too many pages watch

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield _event(first)
                async for state in updates:
                    if gate.session(session_id, clock()) is None:  # logged out meanwhile (an open page keeps it)
                        return
                    yield _event(state)
            finally:
                await updates.aclose()

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def open_invite(request: Request) -> Response:
        return JSONResponse(await invite.open())

    async def cancel_invite(request: Request) -> Response:
        invite.cancel()
        return Response(status_code=204)

    async def invite_qr(request: Request) -> Response:
        svg = invite.qr_svg
        if svg is None:
            return JSONResponse({"error": "no invite is open"}, status_code=404)
        return Response(svg, media_type="image/svg+xml")

    async def revoke(request: Request) -> Response:
        device = (await _json_body(request)).get("device")
        if not isinstance(device, str):
            raise GuiRequestError("name the device to revoke")
        result = await call(node, "devices.revoke", {"device": device, "reason": REVOKE_REASON})
        live.poke()
        return JSONResponse(result)

    async def log_out(request: Request) -> Response:
        gate.log_out(_session(request)[0])
        response = Response(status_code=204)
        response.delete_cookie(gate.cookie_name, httponly=True, samesite="strict")
        return response

    endpoints = [
        ("/", index, ["GET"]),
        ("/api/session", session_info, ["GET"]),
        ("/api/events", events, ["GET"]),
        ("/api/invite", open_invite, ["POST"]),
        ("/api/invite/cancel", cancel_invite, ["POST"]),
        ("/api/invite.svg", invite_qr, ["GET"]),
        ("/api/revoke", revoke, ["POST"]),
        ("/api/logout", log_out, ["POST"]),
    ]
    routes: list[BaseRoute] = [
        Route(path, _answers_errors(endpoint), methods=methods) for path, endpoint, methods in endpoints
    ]
    routes.append(Mount("/static", StaticFiles(packages=[("node.gui", "static")])))
    return Guard(Starlette(routes=routes, max_body_size=BODY_BYTES_MAX), gate, clock)


def _event(state: str | None) -> bytes:
    """One server-sent event: the page state, or a comment that keeps a quiet stream alive."""
    return b": quiet\n\n" if state is None else b"event: state\ndata: " + state.encode() + b"\n\n"


def _answers_errors(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Answer a refused request with its message as JSON, for the page to show; a bug is logged and answered 500."""

    @wraps(endpoint)
    async def answering(request: Request) -> Response:
        try:
            return await endpoint(request)
        except GuiRequestError as error:
            return JSONResponse({"error": str(error)}, status_code=error.status_code)
        except Exception as error:
            if isinstance(getattr(type(error), "rpc_error_type", None), str):  # how the node marks the caller's errors
                return JSONResponse({"error": str(error)}, status_code=400)
            log.error("the page's request %s %s failed", request.method, request.url.path, exc_info=error)
            return JSONResponse({"error": f"internal error: {type(error).__name__}"}, status_code=500)

    return answering
