"""The page of a real `aico-node run` over plain HTTP: no session -> 401, a wrong Host -> refused, a cross-origin or
token-less POST -> refused, bounded bodies and rates; where it is served, and what happens when it cannot be."""

import http.client
import json
import signal
import socket
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from node.gui.address import DEFAULT_PORT
from tests.gui.page import gui_url, log_in, login_link, request
from tests.processes import LOOPBACK, RunningNode, cli, env, wait_until

PAGE_PATHS = ["/", "/static/app.js", "/static/style.css", "/api/session", "/api/events", "/api/invite.svg", "/nowhere"]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    home = tmp_path_factory.mktemp("gui") / "a"
    assert cli(home, "init").returncode == 0
    running = RunningNode(home, gui="127.0.0.1:0")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def spare_home(tmp_path_factory):
    """A second home, for the tests that start (and stop) a node of their own, one at a time."""
    home = tmp_path_factory.mktemp("spare") / "a"
    assert cli(home, "init", "--name", "first device").returncode == 0
    return home


def test_the_ready_line_status_and_gui_command_name_the_page(node):
    url = gui_url(node)
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.hostname == "127.0.0.1" and parts.port and parts.path == "/"
    status = node.call("status")
    assert status["gui"]["url"] == url and isinstance(status["gui"]["sessions"], int)
    link = login_link(node)
    assert link.startswith(url + "login?token=") and len(link) > len(url) + 40
    assert login_link(node) != link  # every link is new


def test_every_request_without_a_session_gets_401(node):
    url = gui_url(node).rstrip("/")
    stranger = f"aico_session_{urlsplit(url).port}=made-up"
    for path in PAGE_PATHS:
        for headers in ({}, {"Cookie": stranger}):
            answer = request(url + path, headers=headers)
            assert answer.status == 401, (path, headers, answer)
            assert b"<html" not in answer.body and b"device" not in answer.body
    headers = {"Origin": url, "Content-Type": "application/json"}
    assert request(url + "/api/revoke", "POST", headers=headers, body=b"{}").status == 401


def test_a_login_link_works_once(node):
    link = login_link(node)
    first = request(link)
    assert first.status == 303 and "HttpOnly" in first.headers["set-cookie"]
    assert "SameSite=Strict" in first.headers["set-cookie"]
    assert request(link).status == 401
    assert request(gui_url(node) + "login?token=" + "A" * 43).status == 401
    assert request(gui_url(node) + "login").status == 401


def test_a_wrong_host_is_refused_even_with_a_session(node):
    session = log_in(node)
    port = urlsplit(session.base).port
    for host in ("evil.example", f"evil.example:{port}", f"localhost:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1"):
        answer = request(session.base, headers={"Cookie": session.cookie}, host=host)
        assert answer.status == 421, (host, answer)
        assert b"device" not in answer.body
    # A login link fetched under another name is refused before its token is looked at, so it still works here.
    link = login_link(node)
    assert request(link, host=f"localhost:{port}").status == 421
    assert request(link).status == 303
    assert session.get("/").status == 200


def test_a_cross_origin_or_tokenless_post_is_refused_and_changes_nothing(node):
    session = log_in(node)
    other_port = urlsplit(session.base).port + 1
    before = node.call("devices.list")
    refused = node.call("status")["gui"]["refused"]
    bad = [
        {"origin": "http://evil.example"},
        {"origin": f"http://127.0.0.1:{other_port}"},  # same site as the page, another origin
        {"origin": "null"},
        {"origin": None},
        {"Sec-Fetch-Site": "cross-site"},
        {"csrf": None},
        {"csrf": "not-the-token"},
    ]
    for case in bad:
        answer = session.post("/api/revoke", {"device": node.device_id}, **case)
        assert answer.status == 403, (case, answer)
    for path in ("/api/invite", "/api/logout"):
        assert session.post(path, {}, origin="http://evil.example").status == 403
    # Another site (another local port is the same site) may navigate to the page but fetch nothing from it.
    assert session.get("/api/session", **{"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}).status == 403
    assert session.get("/", **{"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}).status == 403
    assert session.get("/", **{"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate"}).status == 200
    assert node.call("devices.list") == before
    now_refused = node.call("status")["gui"]["refused"]
    assert now_refused["origin"] - refused.get("origin", 0) == 5 + 2 + 2
    assert now_refused["csrf"] - refused.get("csrf", 0) == 2
    # The same request from the page's own origin with its token gets through to the node, which answers it.
    answer = session.post("/api/revoke", {"device": node.device_id})
    assert answer.status == 400 and "cannot revoke itself" in answer.json()["error"]
    assert node.call("devices.list") == before


def test_one_invite_at_a_time_with_its_qr_code_until_cancelled(node):
    session = log_in(node)
    opened = session.post("/api/invite", {})
    assert opened.status == 200, opened
    invite = opened.json()
    assert invite["outcome"] == "waiting" and len(invite["code"]) == 11 and invite["addresses"] == [node.address]
    again = session.post("/api/invite", {})
    assert again.status == 409 and "already open" in again.json()["error"]
    qr = session.get("/api/invite.svg")
    assert qr.status == 200 and qr.headers["content-type"] == "image/svg+xml" and qr.body.startswith(b"<svg")
    assert session.post("/api/invite/cancel", {}).status == 204
    wait_until(lambda: session.get("/api/invite.svg").status == 404, 10, "the invite to close")
    reopened = session.post("/api/invite", {})
    assert reopened.status == 200 and reopened.json()["code"] != invite["code"]
    assert session.post("/api/invite/cancel", {}).status == 204


def test_logging_out_ends_the_session_and_its_live_stream(node):
    session = log_in(node)
    parts = urlsplit(session.base)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", "/api/events", headers={"Cookie": session.cookie})
        response = connection.getresponse()
        assert response.readline() == b"event: state\n"
        assert session.post("/api/logout", {}).status == 204
        assert session.get("/api/session").status == 401
        node.call("pref.set", key="after", value="logout")  # a change: the stream checks its session and ends
        rest = response.read()  # returns, rather than waiting for the socket's timeout: the stream has ended
        assert rest.startswith(b"data: {") and response.isclosed()
    finally:
        connection.close()


def test_bodies_are_bounded_and_must_be_json(node):
    session = log_in(node)
    answer = session.post("/api/revoke", {"device": "x" * 5000})
    assert answer.status == 413
    answer = session.post("/api/revoke", {}, **{"Content-Type": "text/plain"})
    assert answer.status == 415
    assert session.post("/api/revoke", {"device": 7}).status == 400


def test_the_live_stream_sends_the_state_and_a_stopping_node_ends_it(spare_home):
    home = spare_home
    node = RunningNode(home, gui="127.0.0.1:0")
    try:
        session = log_in(node)
        parts = urlsplit(session.base)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        connection.request("GET", "/api/events", headers={"Cookie": session.cookie})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
        assert response.readline() == b"event: state\n"
        state = json.loads(response.readline().removeprefix(b"data: "))
        assert state["this"]["device_id"] == node.device_id and state["this"]["name"] == "first device"
        assert [d["device_id"] for d in state["devices"]] == [node.device_id]
        node.stop()  # with the stream still open
        assert node.process.returncode == 0
        with pytest.raises(http.client.IncompleteRead):  # not a timeout: the stream is cut when the node stops
            response.read()
    finally:
        node.stop()


def _listening_socket(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def _warnings(node: RunningNode) -> list[str]:
    return [line for line in node.log.read_text().splitlines() if "warning" in line]


def test_a_port_in_use_is_one_warning_and_the_node_runs_on_without_the_page(spare_home):
    home = spare_home
    taken = _listening_socket()
    port = taken.getsockname()[1]
    try:
        node = RunningNode(home, gui=f"127.0.0.1:{port}")
        try:
            assert node.ready["gui"]["url"] is None and "in use" in node.ready["gui"]["error"]
            [warning] = _warnings(node)
            assert "runs without its local page" in warning and f"127.0.0.1:{port} is in use" in warning
            assert node.call("status")["gui"] == node.ready["gui"]
            node.call("pref.set", key="theme", value="dark")  # the node serves on
            done = cli(home, "gui")
            assert done.returncode == 1 and "serves no page" in done.stderr
        finally:
            node.stop()
    finally:
        taken.close()


def test_no_gui_turns_the_page_off(spare_home):
    home = spare_home
    node = RunningNode(home)  # the helper passes --no-gui
    try:
        assert node.ready["gui"] is None and node.call("status")["gui"] is None
        done = cli(home, "gui")
        assert done.returncode == 1 and "serves no page" in done.stderr
    finally:
        node.stop()


def test_the_default_address_is_loopback_on_the_fixed_port(spare_home):
    home = spare_home
    try:  # another program (or a node of this machine's user) may hold the port: then the warning is the answer
        _listening_socket(DEFAULT_PORT).close()
        free = True
    except OSError:
        free = False
    command = [sys.executable, "-m", "cli", "--home", str(home), "run", "--listen", LOOPBACK, "--no-mdns"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        ready = json.loads(process.stdout.readline())
        if free:
            assert ready["gui"]["url"] == f"http://127.0.0.1:{DEFAULT_PORT}/"
        else:
            assert "in use" in ready["gui"]["error"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.parametrize("address", ["0.0.0.0:8395", "192.168.1.20:8395", "[::]:0"])
def test_an_address_off_loopback_is_refused_before_anything_starts(tmp_path, address):
    done = cli(tmp_path / "a", "run", "--gui", address)
    assert done.returncode == 2 and "loopback only" in done.stderr
    assert not (tmp_path / "a").exists()


def test_gui_without_a_running_node_says_how_to_start_one(spare_home):
    home = spare_home
    done = cli(home, "gui")
    assert done.returncode == 1 and "aico-node run" in done.stderr


def test_requests_beyond_the_rate_get_429_and_the_page_recovers(node):
    session = log_in(node)
    statuses = [session.get("/api/session").status for _ in range(100)]
    assert statuses.count(200) >= 20 and 429 in statuses
    wait_until(lambda: session.get("/api/session").status == 200, 10, "the rate bucket to refill")
