"""`bench scale`: a home holding years of history, beside an empty home and a plain SQLCipher table of the same rows.

Each size is imported with `aico-node import` (the stores opened by the command, as a person with no node running
would), then started with `aico-node run`: time to the ready line and resident memory once ready. Then a fresh device
pairs with it (`pair join`, which ends once the device holds everything) and is started in its turn. Once that device
has said it holds everything, the home's op log is compacted as its node would, and a second fresh device pairs with
it: the state comes to it streamed in parts.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from simulations.bench_stores import raw_message_insert_s
from simulations.bench_sync import PASSPHRASE, NodeProcess, pair_home
from simulations.metrics import Metric, metric, rss_mib

SCALE_SIZES = (100_000, 1_000_000)
IMPORT_TIMEOUT_S = 3600.0
EPOCH_MS = 1_600_000_000_000  # history that starts a few years back


def _message(number: int) -> dict:
    return {
        "type": "message",
        "conversation": f"conversation-{number % 50}",
        "text": f"message number {number} about tea, walks and music",
        "role": "user" if number % 2 else "assistant",
        "ts_ms": EPOCH_MS + number * 60_000,
        "sentiment": ((number * 37) % 200 - 100) / 100,
        "response_time_ms": float(100 + (number * 53) % 2900),
    }


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "cli", "--home", str(home), *args], capture_output=True, text=True,
        env={**os.environ, "AICO_PASSPHRASE": PASSPHRASE}, stdin=subprocess.DEVNULL, timeout=IMPORT_TIMEOUT_S,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"aico-node {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _ready_and_rss(home: Path) -> tuple[float, float, float]:
    """Seconds from `aico-node run` to its ready line, its resident memory then, and once its derived stores are loaded
    (analytics and the vector index, which it loads after the ready line), in MiB."""
    started = time.perf_counter()
    with NodeProcess(home) as node:
        ready_s, ready_rss = node.ready_at - started, rss_mib(node.process.pid)
        with node.client() as client:
            client.call("status")  # counts every derived store, so it answers once each is loaded
        return ready_s, ready_rss, rss_mib(node.process.pid)


def _fresh_pair(home: Path, joiner: Path) -> tuple[float, bool]:
    """Seconds for a fresh device to pair with a running node on `home` and hold all it holds, and whether the two
    digests are then equal."""
    with NodeProcess(home) as inviter:
        started = time.perf_counter()
        pair_home(inviter, joiner)
        pair_s = time.perf_counter() - started
        inviter_digest = _cli(home, "digest").stdout
    return pair_s, _cli(joiner, "digest").stdout == inviter_digest


def _home_bytes(home: Path) -> int:
    return sum(path.stat().st_size for path in home.rglob("*") if path.is_file())


def _compacted(home: Path) -> tuple[int, int]:
    """Compact a stopped home's op log as its node would; return the batches deleted and the bytes of the primary
    store's pages left free by them (SQLite reuses them for later writes; the file keeps its size)."""
    from node.app import Node
    from node.net.peers import compact_stopped_home

    async def compact() -> tuple[int, int]:
        async with Node.opened(home, PASSPHRASE, "bench scale") as node:
            deleted = await compact_stopped_home(node.data, node.identity.device_id)
            (free,) = await node.data.sql.query("PRAGMA freelist_count")
            (page,) = await node.data.sql.query("PRAGMA page_size")
            return deleted, int(free[0]) * int(page[0])

    return trio.run(compact)


def _raw_table(path: Path, size: int) -> tuple[float, int]:
    """Seconds to insert the same rows with one executemany into a plain SQLCipher table, and the file's bytes."""
    rows = []
    for number in range(size):
        message = _message(number)
        del message["type"]
        rows.append((f"{message['ts_ms']:012x}{number:020x}", *message.values()))
    return raw_message_insert_s(path, os.urandom(32), rows), path.stat().st_size


def bench_scale() -> list[Metric]:
    with tempfile.TemporaryDirectory(prefix="aico-bench-scale-") as tmp:
        root = Path(tmp)
        empty = root / "empty"
        _cli(empty, "init", "--name", "bench")
        empty_ready_s, empty_rss, empty_settled_rss = _ready_and_rss(empty)
        empty_bytes = _home_bytes(empty)
        metrics = []
        for size in SCALE_SIZES:
            home, history = root / f"home-{size}", root / f"history-{size}.jsonl"
            _cli(home, "init", "--name", "bench")
            with history.open("w") as file:
                for number in range(size):
                    file.write(json.dumps(_message(number)) + "\n")
            started = time.perf_counter()
            _cli(home, "import", str(history), "--json")
            import_s = time.perf_counter() - started
            raw_s, raw_bytes = _raw_table(root / f"raw-{size}.db", size)
            history.unlink()
            ready_s, rss, settled_rss = _ready_and_rss(home)
            per_message = (_home_bytes(home) - empty_bytes) / size
            pair_s, same = _fresh_pair(home, root / f"joined-{size}")
            _, joined_rss, _ = _ready_and_rss(root / f"joined-{size}")
            compacted, free_bytes = _compacted(home)
            compacted_per_message = (_home_bytes(home) - free_bytes - empty_bytes) / size
            state_pair_s, state_same = _fresh_pair(home, root / f"joined-state-{size}")
            _, state_joined_rss, _ = _ready_and_rss(root / f"joined-state-{size}")
            label = f"{size // 1000}k"
            metrics += [
                metric(f"import_{label}_messages_s", import_s, "s", raw_s, "<= 60 s at 1M (baseline: executemany)",
                       import_s <= 60 * size / 1_000_000),
                metric(f"ready_{label}_messages_s", ready_s, "s", empty_ready_s, "<= 1.5x an empty home",
                       ready_s <= 1.5 * empty_ready_s),
                metric(f"rss_after_ready_{label}_messages", rss, "MiB", empty_rss, "<= 1.5x an empty home",
                       rss <= 1.5 * empty_rss),
                metric(f"rss_stores_loaded_{label}_messages", settled_rss, "MiB", empty_settled_rss,
                       "reported (an empty home's, loaded likewise)", True),
                metric(f"home_bytes_per_message_{label}", per_message, "B", raw_bytes / size,
                       "reported before compaction (a plain SQLCipher table)", True),
                metric(f"home_bytes_per_message_compacted_{label}", compacted_per_message, "B", raw_bytes / size,
                       f"<= 1.5x a plain SQLCipher table, in pages in use ({compacted} logged batches compacted)",
                       compacted > 0 and compacted_per_message <= 1.5 * raw_bytes / size),
                metric(f"fresh_pair_{label}_messages_s", pair_s, "s", raw_s,
                       "<= 60 s at 1M, equal digests (baseline: executemany)", pair_s <= 60 * size / 1_000_000 and same),
                metric(f"rss_after_ready_paired_{label}", joined_rss, "MiB", empty_rss, "<= 1.5x an empty home",
                       joined_rss <= 1.5 * empty_rss),
                metric(f"fresh_pair_from_state_{label}_messages_s", state_pair_s, "s", raw_s,
                       "<= 60 s at 1M from the compacted home, equal digests (baseline: executemany)",
                       state_pair_s <= 60 * size / 1_000_000 and state_same),
                metric(f"rss_after_ready_paired_from_state_{label}", state_joined_rss, "MiB", empty_rss,
                       "<= 1.5x an empty home", state_joined_rss <= 1.5 * empty_rss),
            ]  # fmt: skip
        return metrics
