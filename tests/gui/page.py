"""A node's local page over plain HTTP, for tests: exact Host, Origin and cookie headers, one request at a time."""

import http.client
import json
from urllib.parse import urlsplit

import attrs

from tests.processes import RunningNode, cli


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def gui_url(node: RunningNode) -> str:
    """The page's address from the node's ready line ("http://127.0.0.1:PORT/")."""
    return node.ready["gui"]["url"]


def login_link(node: RunningNode) -> str:
    done = cli(node.home, "gui")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def request(
    url: str, method: str = "GET", *, host: str | None = None, headers: dict | None = None, body: bytes | None = None
) -> Answer:
    """Send one request to `url`; `host` replaces the Host header (default: the URL's own)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, path, body=body, headers={"Host": host or parts.netloc, **(headers or {})})
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


@attrs.frozen
class Session:
    """A logged-in client of the page: its cookie and CSRF token."""

    base: str
    cookie: str
    csrf: str

    def get(self, path: str, **headers: str) -> Answer:
        return request(self.base + path.lstrip("/"), headers={"Cookie": self.cookie, **headers})

    def post(self, path: str, payload: dict, *, origin: str | None = "same", csrf: str | None = "same", **headers):
        sent = {"Cookie": self.cookie, "Content-Type": "application/json", **headers}
        if origin is not None:
            sent["Origin"] = self.base.rstrip("/") if origin == "same" else origin
        if csrf is not None:
            sent["X-CSRF-Token"] = self.csrf if csrf == "same" else csrf
        return request(self.base + path.lstrip("/"), "POST", headers=sent, body=json.dumps(payload).encode())


def log_in(node: RunningNode) -> Session:
    """Spend a login link from `aico-node gui` for a session."""
    answer = request(login_link(node))
    assert answer.status == 303 and answer.headers["location"] == "/", answer
    cookie = answer.headers["set-cookie"].split(";")[0]
    base = gui_url(node)
    csrf = request(base + "api/session", headers={"Cookie": cookie}).json()["csrf"]
    return Session(base, cookie, csrf)
