// The node's local page: renders the state the node streams (server-sent events) and posts the few actions.
// Every value from the node is put in the page as text, never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
let csrf = null;
let state = null;
let qrShownFor = null;  // the invite code whose QR code the image shows
let revoking = null;  // the device the revoke dialog asks about
let source = null;  // the node's stream of states

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node[name] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function setText(id, value) {
  $(id).textContent = value === null || value === undefined ? "–" : String(value);
}

function number(value) {
  return value === null || value === undefined ? "–" : Number(value).toLocaleString("en");
}

function bytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let size = value;
  let unit = 0;
  while (size >= 1000 && unit < units.length - 1) { size /= 1000; unit += 1; }
  return `${unit === 0 ? size : size.toFixed(1)} ${units[unit]}`;
}

// "just now", "40 s ago", "2 min ago", "3 h ago", "5 days ago" from Unix seconds.
function ago(seconds) {
  if (!seconds) return "never";
  const elapsed = Math.max(0, Date.now() / 1000 - seconds);
  if (elapsed < 5) return "just now";
  if (elapsed < 60) return `${Math.floor(elapsed)} s ago`;
  if (elapsed < 3600) return `${Math.floor(elapsed / 60)} min ago`;
  if (elapsed < 86400) return `${Math.floor(elapsed / 3600)} h ago`;
  const days = Math.floor(elapsed / 86400);
  return `${days} day${days === 1 ? "" : "s"} ago`;
}

// "9:58" until a time in Unix seconds.
function countdown(seconds) {
  const left = Math.max(0, Math.round(seconds - Date.now() / 1000));
  return `${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function shortId(deviceId) {
  return deviceId.length > 20 ? `${deviceId.slice(0, 12)}…${deviceId.slice(-6)}` : deviceId;
}

function deviceName(deviceId) {
  const device = state && state.devices.find((d) => d.device_id === deviceId);
  return device && device.name ? device.name : shortId(deviceId);
}

function renderThis(me) {
  setText("this-name", me.name || "unnamed device");
  setText("this-id", me.device_id);
  document.title = `${me.name || "aico-node"} · aico-node`;
  setText("this-epoch", me.epoch + (me.revoked ? " (this device is revoked)" : ""));
  setText("this-ops", `${number(me.ops)} (${number(me.ops_stored)} stored)`);
  const stores = me.stores || {};
  setText("store-messages", number(stores.messages));
  setText("store-memories", number(stores.memories));
  setText("store-analytics", number(stores.analytics_rows));
  setText("store-vectors", number(stores.vector_items));
  setText("store-backlog", number(stores.projector_backlog));
  setText("this-engine", me.engine);
  setText("this-addresses", me.addresses.length ? me.addresses.join("\n") : "not listening");
}

function stateBadge(device) {
  if (device.this) return el("span", { class: "badge this" }, "this device");
  if (device.revoked) return el("span", { class: "badge revoked" }, "revoked");
  return device.online ? el("span", { class: "badge on" }, "online") : el("span", { class: "badge off" }, "offline");
}

function lastSeen(device) {
  if (device.this) return "–";
  if (device.online) return "now";
  return ago(device.last_seen);
}

function renderDevices(devices) {
  const rows = devices.map((device) => {
    const name = el("span", { class: device.name ? "name" : "name unnamed" }, device.name || "unnamed device");
    const revoke = device.this || device.revoked ? "" :
      el("button", { type: "button", class: "revoke", onclick: () => askRevoke(device) }, "Revoke");
    return el("tr", { dataset: { device: device.device_id } },
      el("td", {}, name, el("span", { class: "device-id mono", title: device.device_id }, shortId(device.device_id))),
      el("td", { class: "state" }, stateBadge(device)),
      el("td", { class: "path" }, device.this ? "–" : device.path || "–"),
      el("td", { class: "seen", dataset: { seen: device.this ? "" : String(device.last_seen || "") } }, lastSeen(device)),
      el("td", { class: "num behind-in" }, number(device.ops_behind_in)),
      el("td", { class: "num behind-out" }, number(device.ops_behind_out)),
      el("td", { class: "num bytes-in" }, device.this ? "–" : bytes(device.bytes_in)),
      el("td", { class: "num bytes-out" }, device.this ? "–" : bytes(device.bytes_out)),
      el("td", { class: "num" }, revoke));
  });
  document.querySelector("#devices tbody").replaceChildren(...rows);
}

function renderRelay(relay) {
  $("relay-none").hidden = !!relay;
  $("relay-facts").hidden = !relay;
  if (!relay) return;
  setText("relay-address", relay.address);
  const paused = relay.posts_paused_until && relay.posts_paused_until * 1000 > Date.now();
  setText("relay-state", relay.last_error ? `error: ${relay.last_error}` : paused ? "posting paused: mailbox full" : "ok");
  $("relay-last-ok").dataset.time = String(relay.last_ok || "");
  setText("relay-last-ok", ago(relay.last_ok));
  setText("relay-posted", relay.posted_seq === null ? "nothing yet" : `op ${number(relay.posted_seq)}`);
  setText("relay-circuit", relay.circuit_address || "none");
}

function value(v) {
  return typeof v === "string" ? v : JSON.stringify(v);
}

function renderConflicts(conflicts) {
  $("conflicts-none").hidden = conflicts.length > 0;
  $("conflicts").hidden = conflicts.length === 0;
  const rows = conflicts.map((c) => el("tr", {},
    el("td", {}, c.collection), el("td", { class: "mono" }, c.key), el("td", {}, c.field || "–"),
    el("td", {}, value(c.winner_value)), el("td", {}, value(c.loser_value)),
    el("td", {}, `${deviceName(c.loser_device)} (op ${c.loser_seq})`)));
  document.querySelector("#conflicts tbody").replaceChildren(...rows);
}

const OUTCOMES = {
  waiting: ["Waiting for the new device…", ""],
  paired: ["", "good"],
  expired: ["The invite expired.", "bad"],
  cancelled: ["The invite was cancelled.", ""],
  "no attempts left": ["Too many wrong codes: the invite is closed.", "bad"],
};

function renderInvite(invite) {
  const open = !!invite && invite.outcome === "waiting";
  $("invite-open").disabled = open;
  $("invite-panel").hidden = !invite;
  if (!invite) return;
  $("invite-code").textContent = invite.code;
  $("invite-command").textContent =
    `aico-node pair join ${invite.code} --address ${invite.addresses[0] || "ADDRESS"}`;
  const qr = $("invite-qr");
  if (open && qrShownFor !== invite.code) {
    qr.src = `/api/invite.svg?for=${Date.now()}`;
    qrShownFor = invite.code;
  }
  qr.hidden = !open;
  $("invite-cancel").hidden = !open;
  let [text, tone] = OUTCOMES[invite.outcome] || [`The invite ${invite.outcome}.`, "bad"];
  if (invite.outcome === "paired") text = `Paired with ${deviceName(invite.paired)}.`;
  if (open && invite.attempts_left !== null) text += ` A wrong code was tried; ${invite.attempts_left} attempts left.`;
  if (open) text += ` It expires in ${countdown(invite.expires)}.`;
  $("invite-outcome").textContent = text;
  $("invite-outcome").className = `outcome ${tone}`;
}

function render() {
  renderThis(state.this);
  renderDevices(state.devices);
  renderRelay(state.relay);
  renderConflicts(state.conflicts);
  renderInvite(state.invite);
}

// Relative times move on between updates.
function renderTimes() {
  if (!state) return;
  for (const cell of document.querySelectorAll("td.seen")) {
    const device = state.devices.find((d) => d.device_id === cell.parentElement.dataset.device);
    if (device) cell.textContent = lastSeen(device);
  }
  if (state.relay) setText("relay-last-ok", ago(state.relay.last_ok));
  renderInvite(state.invite);
}

function setLive(live, text) {
  $("live").textContent = text || (live ? "live" : "reconnecting");
  $("live").className = `badge ${live ? "on" : "off"}`;
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(body || {}),
  });
  const text = await response.text();
  let answer = null;
  try { answer = text ? JSON.parse(text) : null; } catch { answer = { error: text.trim() }; }
  if (!response.ok) throw new Error((answer && answer.error) || `the node answered ${response.status}`);
  return answer;
}

async function act(action) {
  showError("");
  try { await action(); } catch (error) { showError(error.message); }
}

function askRevoke(device) {
  revoking = device;
  $("revoke-name").textContent = device.name || device.device_id;
  $("revoke-dialog").showModal();
}

function connect() {
  source = new EventSource("/api/events");
  source.addEventListener("state", (event) => {
    state = JSON.parse(event.data);
    render();
    setLive(true);
  });
  source.addEventListener("open", () => setLive(true));
  source.addEventListener("error", () => {
    // EventSource reconnects by itself, unless the node refused the stream (logged out, or the node stopped).
    setLive(false, source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting");
  });
}

async function start() {
  $("invite-open").addEventListener("click", () => act(async () => {
    state = state && { ...state, invite: await post("/api/invite") };
    if (state) renderInvite(state.invite);
  }));
  $("invite-cancel").addEventListener("click", () => act(() => post("/api/invite/cancel")));
  $("revoke-keep").addEventListener("click", () => $("revoke-dialog").close());
  $("revoke-confirm").addEventListener("click", () => act(async () => {
    $("revoke-dialog").close();
    await post("/api/revoke", { device: revoking.device_id });
  }));
  $("logout").addEventListener("click", () => act(async () => {
    await post("/api/logout");
    source.close();
    document.body.replaceChildren(el("p", { class: "error" }, "Logged out. Open the page again with `aico-node gui`."));
  }));
  const response = await fetch("/api/session", { credentials: "same-origin" });
  if (!response.ok) {
    showError("Not logged in: open this page with the link `aico-node gui` prints.");
    return;
  }
  csrf = (await response.json()).csrf;
  connect();
  setInterval(renderTimes, 1000);
}

start();
