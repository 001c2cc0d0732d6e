"""Headless Chromium on the page of a real node paired with a second one: both devices by name and path, a write on
the second shown within 2 s without a reload, an invite whose QR code `pair join` accepts, a revoke, and a page from
another local port that cannot act on the node."""

import json
import subprocess
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from playwright.sync_api import expect

from tests.gui.page import gui_url, login_link
from tests.processes import RunningNode, cli, converged, pair, wait_until

VIEWPORT = {"width": 1280, "height": 800}
LIVE_WITHIN_MS = 2000


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    folder = tmp_path_factory.mktemp("group")
    assert cli(folder / "a", "init", "--name", "first device").returncode == 0
    a = RunningNode(folder / "a", gui="127.0.0.1:0")
    nodes = [a]
    try:
        done = pair(a, folder / "b")
        assert done.returncode == 0, done.stderr
        b = RunningNode(folder / "b", a.address)
        nodes.append(b)
        wait_until(lambda: converged(a, b), what="a and b to converge")
        yield a, b
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def page(browser, group):
    """A logged-in page of the first node; every request it makes is kept, to check none leaves the page's origin."""
    a, _ = group
    context = browser.new_context(viewport=VIEWPORT)
    requested: list[str] = []
    context.on("request", lambda request: requested.append(request.url))
    opened = context.new_page()
    opened.goto(login_link(a))
    expect(opened).to_have_url(gui_url(a))
    yield opened
    origin = gui_url(a)
    assert requested and all(url.startswith(origin) for url in requested), requested
    context.close()


def row(page, device_id: str):
    return page.locator(f'#devices tbody tr[data-device="{device_id}"]')


def test_both_devices_by_name_and_path_and_a_write_on_the_second_shows_live(group, page, artifacts):
    a, b = group
    expect(page.locator("#devices tbody tr")).to_have_count(2)
    expect(page.locator("#this-name")).to_have_text("first device")
    expect(row(page, a.device_id).locator(".name")).to_have_text("first device")
    expect(row(page, a.device_id).locator(".state")).to_have_text("this device")
    other = row(page, b.device_id)
    expect(other.locator(".name")).to_have_text("paired device")
    expect(other.locator(".state")).to_have_text("online")
    expect(other.locator(".path")).to_have_text("direct")
    expect(other.locator(".seen")).to_have_text("now")
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator("#store-messages")).to_have_text("0")
    assert page.evaluate("document.cookie") == ""  # the session cookie is HttpOnly
    page.evaluate("window.notReloaded = true")

    b.call("msg.add", conversation="chat", text="written on the second device")
    written = time.monotonic()
    expect(page.locator("#store-messages")).to_have_text("1", timeout=LIVE_WITHIN_MS)
    assert time.monotonic() - written < LIVE_WITHIN_MS / 1000
    assert page.evaluate("window.notReloaded === true")
    expect(other.locator(".behind-in")).to_have_text("0")
    page.screenshot(path=artifacts / "gui-1280x800.png")


def test_add_a_device_shows_a_qr_code_that_pair_join_accepts_then_revoke_it(group, page, artifacts, tmp_path):
    a, b = group
    expect(page.locator("#devices tbody tr")).to_have_count(2)
    page.click("#invite-open")
    qr = page.locator("#invite-qr")
    expect(qr).to_be_visible()
    loaded = "() => { const qr = document.getElementById('invite-qr'); return qr.complete && qr.naturalWidth > 0; }"
    page.wait_for_function(loaded)
    expect(page.locator("#invite-outcome")).to_contain_text("Waiting for the new device")
    page.screenshot(path=artifacts / "gui-invite-1280x800.png")
    picture = tmp_path / "qr.png"
    qr.screenshot(path=picture)
    decoded = subprocess.run(["zbarimg", "--raw", "-q", str(picture)], capture_output=True, text=True, timeout=30)
    assert decoded.returncode == 0, decoded.stderr
    invite = json.loads(decoded.stdout)
    assert invite["code"] == page.locator("#invite-code").inner_text()

    joined = cli(tmp_path / "c", "pair", "join", invite["code"], "--address", invite["addresses"][0])
    assert joined.returncode == 0, joined.stderr
    expect(page.locator("#invite-outcome")).to_contain_text("Paired with", timeout=10_000)
    expect(qr).to_be_hidden()
    expect(page.locator("#devices tbody tr")).to_have_count(3)
    [new] = [d["device"] for d in a.call("devices.list") if d["device"] not in (a.device_id, b.device_id)]
    expect(row(page, new).locator(".state")).to_have_text("offline")

    row(page, new).get_by_role("button", name="Revoke").click()
    expect(page.locator("#revoke-dialog")).to_be_visible()
    page.click("#revoke-keep")
    expect(page.locator("#revoke-dialog")).to_be_hidden()
    assert not any(d["revoked"] for d in a.call("devices.list"))
    row(page, new).get_by_role("button", name="Revoke").click()
    page.click("#revoke-confirm")
    expect(row(page, new).locator(".state")).to_have_text("revoked")
    assert [d["device"] for d in a.call("devices.list") if d["revoked"]] == [new]
    expect(row(page, b.device_id).locator(".state")).to_have_text("online")
    expect(page.locator("#error")).to_be_hidden()


ATTACK = """<!doctype html><script>
const node = %s;
async function attempt(name, run) {
  try { const r = await run(); results[name] = r.type === "opaque" ? "opaque" : String(r.status); }
  catch (error) { results[name] = "blocked"; }
}
window.results = {};
(async () => {
  await attempt("simple post", () => fetch(node + "api/revoke", {method: "POST", mode: "no-cors",
    credentials: "include", headers: {"Content-Type": "text/plain"}, body: JSON.stringify({device: %s})}));
  await attempt("json post", () => fetch(node + "api/revoke", {method: "POST", credentials: "include",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": "guess"}, body: "{}"}));
  await attempt("read token", () => fetch(node + "api/session", {credentials: "include"}));
  document.title = "done";
})();
</script>"""


@contextmanager
def attacker_site(body: str):
    """A page served from another port of this host, as any local program could serve one; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            encoded = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(encoded)))
            self.end_headers()
            self.wfile.write(encoded)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_page_on_another_local_port_cannot_act_on_the_node(group, browser):
    a, b = group
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(login_link(a))  # this browser holds a session on the node's page
        node = gui_url(a)
        refused = a.call("status")["gui"]["refused"].get("origin", 0)
        # Same host, another port: the same site, so the SameSite cookie goes along; Origin and CSRF stop it.
        with attacker_site(ATTACK % (json.dumps(node), json.dumps(b.device_id))) as attacker:
            page.goto(attacker)
            expect(page).to_have_title("done")
        # Each request reaches the node, which refuses it for where it comes from (the POST, the other's preflight,
        # the GET), and the attacking page cannot even read the refusals.
        assert page.evaluate("window.results") == dict.fromkeys(["simple post", "json post", "read token"], "blocked")
        assert a.call("status")["gui"]["refused"]["origin"] >= refused + 3
        assert not any(d["revoked"] for d in a.call("devices.list") if d["device"] == b.device_id)
    finally:
        context.close()
