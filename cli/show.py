"""Human-readable renderings of what the node answers: plain lines, columns padded to fit, never wrapped mid-value.

Every function returns lines; the commands print them. Values a person reads are spelled out: times as "2 min ago",
missing values as words, JSON for stored values, never Python reprs.
"""

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

LABEL_CHARS = 14  # the width of the label column of `status`
SHORT_ID_CHARS = 8
PATHS = {  # how status' `path` reads (docs/spec and README name them)
    "lan": "on the LAN",
    "direct": "direct",
    "relayed": "through the relay",
    "mailbox": "through the relay's mailbox",
}


def short_id(device_id: str) -> str:
    """The tail of a device id: every Ed25519 peer id starts with the same "12D3KooW", so the end tells them apart."""
    return "…" + device_id[-SHORT_ID_CHARS:]


def device_label(name: str | None, device_id: str) -> str:
    """A device as a person knows it: its name and short id."""
    return f"{name or 'unnamed device'} ({short_id(device_id)})"


def ago(unix_s: float | None, now_s: float) -> str:
    """How long ago `unix_s` was, in the largest unit that fits ("just now", "2 min ago", "3 h ago"); "never" for None."""
    if unix_s is None:
        return "never"
    return _span(now_s - unix_s, "{} ago", "just now")


def until(unix_s: float, now_s: float) -> str:
    """How long until `unix_s` ("in 5 min"), or how long ago it passed."""
    if unix_s < now_s:
        return ago(unix_s, now_s)
    return _span(unix_s - now_s, "in {}", "now")


def _span(seconds: float, template: str, instant: str) -> str:
    if seconds < 5:
        return instant
    for unit, unit_s in (("days", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= 1.5 * unit_s:
            return template.format(f"{round(seconds / unit_s)} {unit}")
    return template.format(f"{round(seconds)} s")


def count(number: int, noun: str, plural: str | None = None) -> str:
    """`number` with thousands separators and `noun`, plural unless it is 1 ("1 message", "1,203 messages")."""
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"


def value_text(value: Any) -> str:
    """A stored value as JSON on one line: what `pref set` takes back."""
    return json.dumps(value, ensure_ascii=False, default=str)


def columns(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """`rows` as lines whose cells are padded to line up; the last cell is never padded, so nothing trails."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max((len(r) for r in rows), default=0))]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + list(row[-1:])
        lines.append(indent + "  ".join(cells).rstrip())
    return lines


def labelled(label: str, lines: Iterable[str]) -> list[str]:
    """`lines` under `label`: the first beside it, the rest indented below it."""
    shown = []
    for i, line in enumerate(lines):
        shown.append((label if i == 0 else "").ljust(LABEL_CHARS) + line)
    return shown or [label]


def status_lines(status: dict[str, Any], *, running: bool, now_s: float | None = None) -> list[str]:
    """`status` as a person reads it: this device, its addresses, each device of the group, the relay, the stores."""
    now_s = time.time() if now_s is None else now_s
    this = f"{device_label(status.get('name'), status['device_id'])}, group key epoch {status['group_epoch']}"
    if status.get("revoked"):
        this += "; REVOKED: this device reads and writes nothing new of the group"
    lines = labelled("This device", [this])
    if running:
        lines += labelled("Listening on", status["addresses"] or ["no address (the network is off)"])
    else:
        lines += labelled("Node", ["not running (read from the stores); `aico-node run` starts it"])
    lines += labelled("Devices", _peer_lines(status["peers"], now_s, running))
    if status.get("relay") is not None:
        lines += labelled("Relay", _relay_lines(status["relay"], status["addresses"], now_s))
    lines += labelled("Data", _store_lines(status))
    if "gui" in status:
        lines += labelled("Page", [_gui_line(status["gui"])])
    return lines


def _peer_lines(peers: list[dict[str, Any]], now_s: float, running: bool) -> list[str]:
    if not running:
        return ["their state is known only while the node runs; `aico-node devices` lists them"]
    if not peers:
        return ["none paired yet; `aico-node pair invite` adds one"]
    rows = []
    for peer in peers:
        state = "online" if peer["online"] else "offline"
        rows.append(
            [
                device_label(peer.get("name"), peer["device_id"]),
                state,
                PATHS.get(peer["path"], peer["path"] or ""),
                f"last sync {ago(peer['last_sync'], now_s)}",
                _lag(peer["ops_behind_in"], peer["ops_behind_out"]),
                _where(peer, now_s),
            ]
        )
    return columns(rows)


def _where(peer: dict[str, Any], now_s: float) -> str:
    """Where the device is (online) or was last seen (offline): its newest address, without its own peer id."""
    addresses = peer.get("addresses") or []
    at = f"at {addresses[0].split('/p2p/')[0]}" if addresses else ""
    if peer["online"]:
        return at
    if peer.get("last_seen") is None:
        return f"last known {at}" if at else "never seen"
    return f"seen {ago(peer['last_seen'], now_s)} {at}".rstrip()


def _lag(behind_in: int, behind_out: int) -> str:
    if not behind_in and not behind_out:
        return "in sync"
    parts = [f"{behind_in:,} ops to receive" if behind_in else "", f"{behind_out:,} ops to send" if behind_out else ""]
    return ", ".join(part for part in parts if part)


def _relay_lines(relay: dict[str, Any], addresses: list[str], now_s: float) -> list[str]:
    if relay.get("last_ok") is not None:
        mailbox = f"mailbox reached {ago(relay['last_ok'], now_s)}"
    else:
        mailbox = "mailbox not reached yet"
    if relay.get("posted_seq"):
        mailbox += f", posted up to change #{relay['posted_seq']:,}"
    if relay.get("posts_paused_until") is not None:
        mailbox += f", posts paused (it is full) until {until(relay['posts_paused_until'], now_s)}"
    if relay.get("circuit_address"):
        expires = relay.get("reservation_expires_at")
        slot = "slot held" + (f", renewed before it expires {until(expires, now_s)}" if expires is not None else "")
    else:
        slot = "no slot on the relay yet"
    lines = [relay["address"], f"{mailbox}; {slot}"]
    if relay.get("circuit_address") and relay["circuit_address"] not in addresses:
        lines.append(f"reached through it at {relay['circuit_address']}")
    if relay.get("last_error"):
        lines.append(f"last error: {relay['last_error']}")
    return lines


def _store_lines(status: dict[str, Any]) -> list[str]:
    ops, stored = status["ops"], status["ops_stored"]
    stored_text = "all stored" if stored >= ops else f"{stored:,} stored so far"
    lines = [f"{count(ops, 'change')} ({stored_text}); primary store: {status['engine']}"]
    if received := status.get("state_received"):
        done, total = received
        lines.append(f"receiving the group's state from another device: {done:,} of about {total:,} messages")
    stores = status.get("stores")
    if stores:
        backlog = stores["projector_backlog"]
        lines.append(
            f"{count(stores['messages'], 'message')}, {count(stores['memories'], 'memory', 'memories')}; "
            f"analytics {count(stores['analytics_rows'], 'row')}, vector index {count(stores['vector_items'], 'item')}"
            + (f"; {count(backlog, 'key')} still to index" if backlog else "")
        )
    return lines


def _gui_line(gui: dict[str, Any] | None) -> str:
    if gui is None:
        return "off (started with --no-gui)"
    if gui.get("url") is None:
        return f"not served: {gui.get('error', 'unknown error')}"
    return f"{gui['url']} (`aico-node gui --open` opens it signed in)"


def conflict_lines(conflicts: list[dict[str, Any]]) -> list[str]:
    """Values that lost a concurrent merge, newest first: where, what was kept, what was lost and from which device."""
    if not conflicts:
        return ["no conflicts"]
    rows = [["collection", "key", "field", "kept", "lost", "lost from"]]
    for row in conflicts:
        rows.append(
            [
                row["collection"],
                row["key"],
                row["field"] or "",
                value_text(row["winner_value"]),
                value_text(row["loser_value"]),
                f"{short_id(row['loser_device'])}, change #{row['loser_seq']}",
            ]
        )
    return columns(rows)


def message_lines(messages: list[dict[str, Any]]) -> list[str]:
    """Messages newest first: local time, role, text (its further lines indented below)."""
    if not messages:
        return ["no messages"]
    lines = []
    for message in messages:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(message["ts_ms"] / 1000))
        head = f"{when}  {message['role']:<9}  "
        text_lines = message["text"].splitlines() or [""]
        lines.append(head + text_lines[0])
        lines += [" " * len(head) + line for line in text_lines[1:]]
    return lines


def memory_lines(memories: list[dict[str, Any]]) -> list[str]:
    """Memories newest first: id (what `forget memory` takes), text, and metadata as key=value."""
    if not memories:
        return ["no memories"]
    lines = []
    for memory in memories:
        tags = ", ".join(f"{key}={value_text(value)}" for key, value in memory["metadata"].items())
        text = " ".join(memory["text"].split())
        lines.append(f"{memory['id']}  {text}" + (f"  [{tags}]" if tags else ""))
    return lines


def preference_lines(preferences: dict[str, Any]) -> list[str]:
    """Preferences by key, each value as JSON."""
    if not preferences:
        return ["no preferences"]
    return columns([[key, value_text(preferences[key])] for key in sorted(preferences)])
