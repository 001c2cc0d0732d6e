"""The page's rules on a clock the test moves: one-time login tokens, sessions, Host, Origin, CSRF, rates, addresses;
and its live feed on a real bus."""

import json

import pytest
import trio

from node.bus import SYNC_REMOTE_APPLIED, Bus
from node.gui.address import DEFAULT_ADDRESS, GuiAddress, bind
from node.gui.errors import GuiError
from node.gui.guard import LOGIN_TOKEN_TTL_S, LOGIN_TOKENS_MAX, SESSION_IDLE_S, SESSIONS_MAX, Gatekeeper, RateBucket
from node.gui.live import LiveFeed

HOST = "127.0.0.1:8395"


def test_a_login_token_opens_one_session_once_and_only_before_it_expires() -> None:
    gate = Gatekeeper(HOST)
    token = gate.issue_login_token(now_s=0.0)
    session_id = gate.log_in(token, now_s=1.0)
    assert session_id and session_id != token
    assert gate.log_in(token, now_s=1.0) is None  # spent
    late = gate.issue_login_token(now_s=0.0)
    assert gate.log_in(late, now_s=LOGIN_TOKEN_TTL_S) is None
    assert gate.log_in("", now_s=1.0) is None and gate.log_in("x" * 43, now_s=1.0) is None
    assert gate.sessions == 1


def test_outstanding_tokens_and_sessions_are_bounded_oldest_first() -> None:
    gate = Gatekeeper(HOST)
    tokens = [gate.issue_login_token(now_s=float(i)) for i in range(LOGIN_TOKENS_MAX + 1)]
    assert gate.log_in(tokens[0], now_s=20.0) is None  # dropped for the newest
    assert gate.log_in(tokens[-1], now_s=20.0) is not None
    sessions = [gate.log_in(gate.issue_login_token(float(i)), now_s=100.0 + i) for i in range(SESSIONS_MAX + 1)]
    assert gate.sessions == SESSIONS_MAX
    assert gate.session(sessions[-1], now_s=200.0) is not None
    assert gate.session(tokens[-1], now_s=200.0) is None  # the token is not a session id


def test_a_session_ends_after_idling_or_logging_out() -> None:
    gate = Gatekeeper(HOST)
    session_id = gate.log_in(gate.issue_login_token(0.0), now_s=0.0)
    assert gate.session(session_id, now_s=SESSION_IDLE_S - 1) is not None  # and this use restarts the idle time
    assert gate.session(session_id, now_s=2 * SESSION_IDLE_S - 2) is not None
    assert gate.session(session_id, now_s=3 * SESSION_IDLE_S) is None
    other = gate.log_in(gate.issue_login_token(0.0), now_s=0.0)
    gate.log_out(other)
    assert gate.session(other, now_s=1.0) is None and gate.session(None, now_s=1.0) is None


def test_host_origin_and_csrf_rules() -> None:
    gate = Gatekeeper(HOST)
    assert gate.cookie_name == "aico_session_8395"
    assert gate.host_allowed(HOST)
    for host in (None, "", "localhost:8395", "127.0.0.1", "127.0.0.1:8396", "evil.example:8395", "127.0.0.1:8395 "):
        assert not gate.host_allowed(host), host
    assert gate.same_origin("http://127.0.0.1:8395", None) and gate.same_origin("http://127.0.0.1:8395", "same-origin")
    for origin, site in [
        (None, None),
        ("null", None),
        ("http://127.0.0.1:8396", None),  # another local port: same site, so SameSite cookies do not stop it
        ("http://localhost:8395", None),
        ("https://127.0.0.1:8395", None),
        ("http://127.0.0.1:8395", "same-site"),
        ("http://127.0.0.1:8395", "cross-site"),
    ]:
        assert not gate.same_origin(origin, site), (origin, site)
    session = gate.session(gate.log_in(gate.issue_login_token(0.0), 0.0), 0.0)
    assert session is not None
    assert gate.csrf_ok(session, session.csrf)
    assert not gate.csrf_ok(session, None) and not gate.csrf_ok(session, "") and not gate.csrf_ok(session, "x")


def test_a_rate_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = RateBucket(rate_per_s=2.0, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # refills to the burst, no further


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DEFAULT_ADDRESS, GuiAddress("127.0.0.1", 8395)),
        ("9000", GuiAddress("127.0.0.1", 9000)),
        ("localhost:0", GuiAddress("127.0.0.1", 0)),
        ("127.0.0.2:80", GuiAddress("127.0.0.2", 80)),
        ("[::1]:8395", GuiAddress("::1", 8395)),
    ],
)
def test_addresses_parse(text: str, expected: GuiAddress) -> None:
    assert GuiAddress.parse(text) == expected


@pytest.mark.parametrize("text", ["0.0.0.0:8395", "192.168.1.5:8395", "[::]:8395", "example.com:80", "127.0.0.1:x",
                                  "127.0.0.1:70000", ""])  # fmt: skip
def test_addresses_off_loopback_or_malformed_are_refused_clearly(text: str) -> None:
    with pytest.raises(GuiError) as raised:
        GuiAddress.parse(text)
    assert "--gui" in str(raised.value) and "\n" not in str(raised.value)


def test_a_port_in_use_is_one_clear_line() -> None:
    taken = bind(GuiAddress("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(GuiError) as raised:
            bind(GuiAddress("127.0.0.1", port))
        assert str(raised.value).startswith(f"the page's address 127.0.0.1:{port} is in use")
        assert "\n" not in str(raised.value)
    finally:
        taken.close()


class _Node:
    """The page's view of a node: a real bus, and no handlers (the feed here builds its state itself)."""

    def __init__(self) -> None:
        self.handlers: dict = {}
        self.bus = Bus()


@pytest.mark.trio
async def test_the_live_feed_listens_only_while_watched_and_pushes_a_bus_event_at_once() -> None:
    node = _Node()
    builds = []

    async def build() -> dict:
        builds.append(trio.current_time())
        return {"applied": len(builds)}

    feed = LiveFeed(node, build)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        await trio.sleep(0.1)
        assert builds == [] and not node.bus.has_subscribers(SYNC_REMOTE_APPLIED)  # nobody watches: no work
        updates = feed.watch()
        with trio.fail_after(1):
            first = json.loads(await anext(updates))
        assert node.bus.has_subscribers(SYNC_REMOTE_APPLIED)
        node.bus.publish(SYNC_REMOTE_APPLIED, {"ops": 1})
        published_at = trio.current_time()
        with trio.fail_after(1):
            second = json.loads(await anext(updates))
        assert second["applied"] > first["applied"]
        # Well before the periodic rebuild: the event drove it.
        assert trio.current_time() - published_at < 0.5
        await updates.aclose()
        with trio.fail_after(3):
            while node.bus.has_subscribers(SYNC_REMOTE_APPLIED):
                await trio.sleep(0.05)
        assert feed.watchers == 0
        nursery.cancel_scope.cancel()
