"""The primary store's schema and the functions that write and read it; the source of truth.

Every function here takes a SqlAdapter and runs on the store's worker thread (via AsyncSql.run).
Local writes and remote ops land in one transaction each: the ops, the materialised rows they
change and new conflict-journal entries. The projector redoes in the derived stores what the
logged ops wrote, following the log (PROJECTED_BATCH), and what the outbox names: changes that
no logged op made (a state snapshot's, a rebuild's).
"""

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar

import attrs
import msgpack

from crdt import (
    Collection,
    Conflict,
    Op,
    decode_op,
    decode_stored_batch,
    redacted_op,
    stored_batch_body,
    stored_batch_keys,
    stored_batch_plain,
)
from crdt.messages import ROW_FIELDS as MESSAGE_ROW_FIELDS
from stores.sql import Migration, SqlAdapter, migrate
from stores.where import matches as where_matches

MIGRATIONS: list[tuple[int, Migration]] = [
    (
        1,
        """
        CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
        CREATE TABLE ops (
            device TEXT NOT NULL, seq INTEGER NOT NULL, collection TEXT NOT NULL, key TEXT NOT NULL,
            body BLOB NOT NULL, PRIMARY KEY (device, seq));
        CREATE INDEX ops_by_key ON ops (collection, key);
        CREATE TABLE preferences (
            collection TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (collection, key));
        CREATE TABLE conversations (id TEXT PRIMARY KEY, message_count INTEGER NOT NULL, last_ts_ms INTEGER NOT NULL);
        CREATE TABLE messages (
            id TEXT PRIMARY KEY, conversation TEXT NOT NULL, role TEXT NOT NULL, text TEXT NOT NULL,
            ts_ms INTEGER NOT NULL, sentiment REAL, response_time_ms REAL);
        CREATE INDEX messages_by_conversation ON messages (conversation, ts_ms);
        CREATE TABLE memories (id TEXT PRIMARY KEY, text TEXT NOT NULL, embedding BLOB, metadata BLOB NOT NULL);
        CREATE TABLE notes (name TEXT PRIMARY KEY, text TEXT NOT NULL);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE TABLE devices (device TEXT PRIMARY KEY, record BLOB NOT NULL, revoked INTEGER NOT NULL);
        CREATE TABLE conflicts (
            id INTEGER PRIMARY KEY AUTOINCREMENT, collection TEXT NOT NULL, key TEXT NOT NULL, field TEXT,
            winner_device TEXT NOT NULL, winner_seq INTEGER NOT NULL, winner_value BLOB,
            loser_device TEXT NOT NULL, loser_seq INTEGER NOT NULL, loser_value BLOB);
        CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, target TEXT NOT NULL, action TEXT NOT NULL,
            key TEXT NOT NULL);
        """,
    ),
    # Nothing reads the op log by key, and the index cost a random B-tree insert per op (a third of a catch-up's
    # writes to the ops table).
    (2, "DROP INDEX ops_by_key;"),
    (3, lambda adapter: _log_ops_in_batches(adapter)),
    (4, lambda adapter: _outbox_of_key_lists(adapter)),
    (5, lambda adapter: _merge_state_of_messages(adapter)),
    # A compacted log gives a device's ops only from just above its base (docs/spec/sync.md, section 6): the ops up to
    # it were folded away, or their effect came in a state snapshot.
    (6, "CREATE TABLE log_bases (device TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;"),
    # AUTOINCREMENT wrote a page of sqlite_sequence in every write (one of the 8.8 pages a message add wrote). The
    # projector needs ids only to rise while rows wait, which a plain rowid gives: it deletes only ids it has read.
    (
        7,
        """
        CREATE TABLE outbox_rowid (id INTEGER PRIMARY KEY, target TEXT NOT NULL, action TEXT NOT NULL,
            keys BLOB NOT NULL, key_count INTEGER NOT NULL);
        INSERT INTO outbox_rowid SELECT id, target, action, keys, key_count FROM outbox;
        DROP TABLE outbox;
        ALTER TABLE outbox_rowid RENAME TO outbox;
        """,
    ),
    # The projector follows the log itself: a write that logs its ops queues no outbox row for the keys they wrote
    # (one B-tree page fewer per write). What was logged before waits in the outbox already.
    (8, lambda adapter: set_meta(adapter, PROJECTED_BATCH, _newest_batch(adapter))),
]
# Set in meta once the messages' merge state is stored (a home from before has it written once at start, from its log).
MESSAGES_MERGED = "messages_merged"
CLOCK_LAST = "clock_last"  # the newest HLC of ops whose runs are not logged (older homes, compacted runs)
STATE_BASE = "state_base"  # the merged state of every collection but messages that a state snapshot brought
PROJECTED_BATCH = "projected_batch"  # the newest logged batch whose keys the derived stores have taken (see projected)
STATE_RESUME = "state_resume"  # where a state snapshot being received stands: [its vector, the last message id merged]
OUTBOX_KEYS_MAX = 500  # keys one outbox row names
OUTBOX_PAGE_ROWS = 8  # outbox rows read per query
LOG_PAGE_BATCHES = 16  # logged batches read per query when reading the whole log
RUNS_SCAN_PAGE = 256  # runs read per query while planning a compaction
LOG_PAGE_OPS = 20_000  # logged ops decoded per page when reading the whole log: the page is transient, but the memory it took stays the process's

T = TypeVar("T")

# Derived stores the projector keeps current.
ANALYTICS, VECTORS, CACHE = "analytics", "vectors", "cache"
UPSERT, DELETE = "upsert", "delete"


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


@attrs.frozen
class Changes:
    """What a write did to the materialised tables, by collection: the rows of keys that changed, and keys now gone."""

    upserts: dict[Collection, dict[str, tuple]] = attrs.field(factory=dict)
    deletes: dict[Collection, list[str]] = attrs.field(factory=dict)
    merged_messages: "MergedMessages | None" = None
    unstored_messages: AbstractSet[str] = frozenset()  # messages with no row in the store yet (ids just made)

    def row_count(self) -> int:
        """Return how many rows the write upserts or deletes."""
        return sum(map(len, self.upserts.values())) + sum(map(len, self.deletes.values()))


@attrs.frozen
class MergedMessages:
    """The merge state of changed messages that their rows do not hold: their winning edits and tombstones."""

    # Messages whose stored edits and tombstone go first: the deleted ones (a delete drops a message's edits), or every
    # changed one when a revocation made the replica recompute its state. Otherwise a change only adds or replaces.
    cleared: Sequence[str]
    edits: Sequence[tuple]  # (id, field, hlc, device, seq, prev device, prev seq, packed value)
    tombstones: Sequence[tuple]  # (id, hlc, device)


@attrs.frozen
class LogBatch:
    """Applied ops to log as one batch, with their batch encoding, deflated, when it is at hand (as received)."""

    ops: Sequence[Op]
    deflated: bytes | None = None


@attrs.frozen
class OutboxEntry:
    """Derived-store updates the projector still owes: one action on some keys of one target."""

    id: int
    target: str
    action: str
    keys: tuple[str, ...]


def open_schema(adapter: SqlAdapter) -> int:
    """Bring the schema up to date and return its version."""
    return migrate(adapter, MIGRATIONS)


def get_meta(adapter: SqlAdapter, name: str) -> Any:
    row = adapter.query_one("SELECT value FROM meta WHERE name = ?", (name,))
    return None if row is None else unpack(row[0])


def set_meta(adapter: SqlAdapter, name: str, value: Any) -> None:
    adapter.execute(
        "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, pack(value)),
    )


def _outbox_of_key_lists(adapter: SqlAdapter) -> None:
    # A row per changed key was one more insert per op of a catch-up; a row now names the keys (up to
    # OUTBOX_KEYS_MAX) that one transaction changed with one action.
    adapter.execute("ALTER TABLE outbox RENAME TO outbox_of_keys")
    adapter.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, target TEXT NOT NULL, action TEXT NOT NULL, "
        "keys BLOB NOT NULL, key_count INTEGER NOT NULL)"
    )
    entries = adapter.query("SELECT target, action, key FROM outbox_of_keys ORDER BY id")
    runs = itertools.groupby(entries, _target_action)
    _queue_projections(adapter, [(target, action, [key for *_, key in run]) for (target, action), run in runs])
    adapter.execute("DROP TABLE outbox_of_keys")


def _queue_projections(adapter: SqlAdapter, runs: Iterable[tuple[str, str, list[str]]]) -> None:
    """Queue (target, action, keys) projections: a row per OUTBOX_KEYS_MAX keys."""
    rows: list[tuple[str, str, bytes, int]] = []
    for target, action, keys in runs:
        for start in range(0, len(keys), OUTBOX_KEYS_MAX):
            chunk = keys[start : start + OUTBOX_KEYS_MAX]
            rows.append((target, action, pack(chunk), len(chunk)))
    adapter.insert_rows("INSERT INTO outbox (target, action, keys, key_count) VALUES", rows)


def _target_action(entry: tuple[str, str, str]) -> tuple[str, str]:
    return entry[0], entry[1]


def _merge_state_of_messages(adapter: SqlAdapter) -> None:
    # A node held every message's merge state in memory (750 bytes a message) and rebuilt it at start from the whole
    # log. The store now keeps it: each message's winning add stamp in its row, winning edits and tombstones in tables.
    # A batch counts the ops it holds of other collections, so a start reads only the batches it must replay.
    # A row names its add's device by number: a device id as text would cost 52 bytes of every message.
    adapter.execute("CREATE TABLE stamp_devices (number INTEGER PRIMARY KEY, device TEXT NOT NULL UNIQUE)")
    adapter.execute("ALTER TABLE messages ADD COLUMN add_hlc INTEGER")
    adapter.execute("ALTER TABLE messages ADD COLUMN add_device INTEGER")
    adapter.execute("ALTER TABLE messages ADD COLUMN add_seq INTEGER")
    adapter.execute(
        "CREATE TABLE message_edits (id TEXT NOT NULL, field TEXT NOT NULL, hlc INTEGER NOT NULL, device TEXT NOT NULL, "
        "seq INTEGER NOT NULL, prev_device TEXT, prev_seq INTEGER, value BLOB NOT NULL, PRIMARY KEY (id, field)) "
        "WITHOUT ROWID"
    )
    adapter.execute(
        "CREATE TABLE message_tombstones (id TEXT PRIMARY KEY, hlc INTEGER NOT NULL, device TEXT NOT NULL) WITHOUT ROWID"
    )
    adapter.execute("ALTER TABLE op_runs ADD COLUMN hlc_max INTEGER")
    # Until counted (at the first start, see MESSAGES_MERGED), a batch may hold ops of any collection.
    adapter.execute("ALTER TABLE op_batches ADD COLUMN other_ops INTEGER NOT NULL DEFAULT 1")
    adapter.execute("CREATE INDEX op_batches_with_other_ops ON op_batches (id) WHERE other_ops > 0")
    if _one_row(adapter, "SELECT count(*) FROM op_batches")[0] == 0:
        set_meta(adapter, MESSAGES_MERGED, 1)


def _log_ops_in_batches(adapter: SqlAdapter) -> None:
    # A row per op cost a catch-up two B-tree inserts per op (rowid and primary key), as much as every other write
    # together. The log now keeps each transaction's ops as one batch, deflated (a catch-up logs batches as they
    # came: a fifth of the bytes to write), and per device the seq range it holds.
    adapter.execute("CREATE TABLE op_batches (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    adapter.execute(
        "CREATE TABLE op_runs (device TEXT NOT NULL, seq_first INTEGER NOT NULL, seq_last INTEGER NOT NULL, "
        "batch INTEGER NOT NULL, PRIMARY KEY (device, seq_first)) WITHOUT ROWID"
    )
    after = 0
    while rows := adapter.query("SELECT rowid, body FROM ops WHERE rowid > ? ORDER BY rowid LIMIT 2000", (after,)):
        _log_batches(adapter, [LogBatch([decode_op(body) for _, body in rows])], counted=False)
        after = rows[-1][0]
    adapter.execute("DROP TABLE ops")


def _log_batches(adapter: SqlAdapter, log: Sequence[LogBatch], counted: bool = True) -> None:
    """Log each batch as one row, and per device the run of seqs it holds; a few statements for any number of
    batches (each statement retakes the GIL, which waits for the switch interval while the main thread is busy).
    A batch is `counted` (its ops of other collections than messages) in a schema of version 5 on."""
    log = [logged for logged in log if logged.ops]
    if not log:
        return
    bodies = [logged.deflated or stored_batch_body(logged.ops) for logged in log]
    if counted:
        rows = [(body, other_ops(logged.ops)) for body, logged in zip(bodies, log)]
        newest = adapter.insert_rows("INSERT INTO op_batches (body, other_ops) VALUES", rows)
    else:
        newest = adapter.insert_rows("INSERT INTO op_batches (body) VALUES", [(body,) for body in bodies])
    # A rowid table without AUTOINCREMENT gives each new row the largest rowid plus one: the batches are the newest
    # row and those just below it (asking SQLite for the largest first was one more statement per write).
    assert newest is not None
    batch_ids = range(newest - len(log) + 1, newest + 1)
    runs: list[tuple[str, int, int, int, int]] = []
    for batch, logged in zip(batch_ids, log):
        # A device's ops are applied in seq order, so those in one batch are one run of seqs.
        seqs: dict[str, list[int]] = {}
        for op in logged.ops:
            run = seqs.setdefault(op.device, [op.seq, op.seq, op.hlc])
            run[1], run[2] = op.seq, max(run[2], op.hlc)
        runs += [(device, first, last, batch, hlc_max) for device, (first, last, hlc_max) in seqs.items()]
    if counted:
        # The newest HLC rides in the run rows: a start takes the clock from them, and a write dirties no other page.
        adapter.insert_rows("INSERT INTO op_runs (device, seq_first, seq_last, batch, hlc_max) VALUES", runs)
    else:
        adapter.insert_rows("INSERT INTO op_runs (device, seq_first, seq_last, batch) VALUES", [run[:4] for run in runs])


def _newest_batch(adapter: SqlAdapter) -> int:
    """Return the id of the newest logged batch (0 if none)."""
    (newest,) = _one_row(adapter, "SELECT coalesce(max(id), 0) FROM op_batches")
    return newest


def logged_clock(adapter: SqlAdapter) -> int:
    """Return the newest HLC of any logged op (0 if none)."""
    (newest,) = _one_row(adapter, "SELECT coalesce(max(hlc_max), 0) FROM op_runs")
    return max(newest, get_meta(adapter, CLOCK_LAST) or 0)


def other_ops(ops: Sequence[Op]) -> int:
    """Return how many of these ops are of another collection than messages (those a start replays)."""
    return sum(op.collection is not Collection.MESSAGES for op in ops)


def _redact_logged(adapter: SqlAdapter, forgotten: Sequence[tuple[Collection, str]]) -> None:
    """Strip the content from every logged op of the forgotten keys, rewriting the batches that hold one."""
    if not forgotten:
        return
    keys = set(forgotten)
    names = [key.encode() for _, key in keys]
    # Nothing indexes the log by key (an index cost every op a B-tree insert), so a forget reads it all, in the
    # forget's own transaction. Only a batch whose bytes hold a forgotten key is decoded: inflating and searching
    # 1M logged messages takes about a tenth of decoding them.
    after = 0
    while rows := _logged_rows(adapter, after):
        after = rows[-1][0]
        for batch, body in rows:
            plain = stored_batch_plain(body)
            if not any(name in plain for name in names):
                continue
            logged = decode_stored_batch(body, held=False)
            if any((op.collection, op.key) in keys for op in logged):
                rewritten = [redacted_op(op) if (op.collection, op.key) in keys else op for op in logged]
                adapter.execute("UPDATE op_batches SET body = ? WHERE id = ?", (stored_batch_body(rewritten), batch))


def logged_pages(adapter: SqlAdapter, after_batch: int, ops_max: int) -> list[tuple[int, list[Op]]]:
    """Return the logged batches after batch id `after_batch`, each as (id, its ops), oldest first, stopping once they
    hold `ops_max` ops."""
    return _logged_decoded(adapter, after_batch, ops_max, decode_stored_batch)


def _logged_decoded(
    adapter: SqlAdapter, after_batch: int, ops_max: int, decode: Callable[[bytes], list[T]]
) -> list[tuple[int, list[T]]]:
    """Return the logged batches after batch id `after_batch`, each as (id, `decode` of its body: one item per op),
    oldest first, stopping once they hold `ops_max` ops."""
    pages: list[tuple[int, list[T]]] = []
    held = 0
    while held < ops_max:
        rows = _logged_rows(adapter, after_batch)
        for after_batch, body in rows:
            pages.append((after_batch, decode(body)))
            held += len(pages[-1][1])
            if held >= ops_max:
                break
        if len(rows) < LOG_PAGE_BATCHES:
            break
    return pages


def logged_ops_besides_messages(adapter: SqlAdapter) -> list[Op]:
    """Return every logged op of another collection than messages, in the order applied (each device's in seq order)."""
    ops: list[Op] = []
    after = 0
    # A home of a million messages has a few hundred ops to replay, not all of its log.
    while rows := _logged_rows_besides_messages(adapter, after):
        after = rows[-1][0]
        ops += [op for _, body in rows for op in decode_stored_batch(body) if op.collection is not Collection.MESSAGES]
    return ops


def _logged_rows_besides_messages(adapter: SqlAdapter, after_batch: int) -> list[tuple[int, bytes]]:
    """Return (id, stored body) of up to LOG_PAGE_BATCHES logged batches after batch id `after_batch` that hold ops of
    other collections than messages, oldest first; by the partial index, a batch of messages alone is not even read."""
    return adapter.query(
        "SELECT id, body FROM op_batches INDEXED BY op_batches_with_other_ops WHERE other_ops > 0 AND id > ? "
        "ORDER BY id LIMIT ?",
        (after_batch, LOG_PAGE_BATCHES),
    )


def _logged_rows(adapter: SqlAdapter, after_batch: int) -> list[tuple[int, bytes]]:
    """Return (id, stored body) of up to LOG_PAGE_BATCHES logged batches after batch id `after_batch`, oldest first."""
    return adapter.query("SELECT id, body FROM op_batches WHERE id > ? ORDER BY id LIMIT ?", (after_batch, LOG_PAGE_BATCHES))


def logged_runs(adapter: SqlAdapter, device: str, after_seq: int, runs_max: int) -> list[tuple[int, int, int]]:
    """Return (seq_first, seq_last, batch) of up to `runs_max` logged runs of a device's ops holding seqs above
    `after_seq`, in seq order."""
    # The run holding after_seq + 1 starts at or before it; found by one descent of the primary key, not a scan.
    start = adapter.query_one(
        "SELECT seq_first FROM op_runs WHERE device = ? AND seq_first <= ? ORDER BY seq_first DESC LIMIT 1",
        (device, after_seq + 1),
    )
    return adapter.query(
        "SELECT seq_first, seq_last, batch FROM op_runs WHERE device = ? AND seq_first >= ? ORDER BY seq_first LIMIT ?",
        (device, after_seq + 1 if start is None else start[0], runs_max),
    )


def logged_bodies(adapter: SqlAdapter, batches: Iterable[int]) -> dict[int, bytes]:
    """Return the stored body of each of these logged batches (see stored_batch_body)."""
    return dict(_rows_where_in(adapter, "SELECT id, body FROM op_batches WHERE id IN", (), batches))


def logged_vector(adapter: SqlAdapter) -> dict[str, int]:
    """Return the highest seq of each device that the log holds or holds the effect of (up to its base)."""
    vector: dict[str, int] = dict(adapter.query("SELECT device, max(seq_last) FROM op_runs GROUP BY device"))
    for device, seq in log_bases(adapter).items():
        vector[device] = max(vector.get(device, 0), seq)
    return vector


def log_bases(adapter: SqlAdapter) -> dict[str, int]:
    """Return the base of each device whose logged ops start above seq 1: ops up to it are not logged."""
    return dict(adapter.query("SELECT device, seq FROM log_bases"))


def _raise_bases(adapter: SqlAdapter, bases: Mapping[str, int]) -> None:
    adapter.insert_rows(
        "INSERT INTO log_bases (device, seq) VALUES",
        list(bases.items()),
        "ON CONFLICT (device) DO UPDATE SET seq = max(seq, excluded.seq)",
    )


@attrs.frozen
class Compaction:
    """Logged batches to delete, each of whose ops every trusted device has, and the bases they raise."""

    batches: Sequence[int]
    runs: Sequence[tuple[str, int]]  # (device, seq_first) of each run the batches hold
    bases: dict[str, int]  # per device, the highest seq of its runs among them
    hlc_max: int  # the newest HLC of their ops: the clock outlives them
    next_after: int  # the batch id the next plan starts after
    cursors: dict[str, int]  # per device, the seq_first its runs are read from by the next plan


def compaction_scope(adapter: SqlAdapter) -> tuple[int, dict[str, int]]:
    """Return the batch before the newest logged one, and a cursor at seq 1 for every device with a run up to it: what
    a compaction considers (batches logged after it began may hold ops of a device it does not read).

    The newest batch stays, so batch ids only ever rise (a new batch takes the largest id plus one, see _log_batches):
    the projector's place in the log (PROJECTED_BATCH) stays behind every batch logged after it.
    """
    upto = max(0, _newest_batch(adapter) - 1)
    return upto, {device: 1 for (device,) in adapter.query("SELECT DISTINCT device FROM op_runs")}


def plan_compaction(
    adapter: SqlAdapter,
    safe: Mapping[str, int],
    cursors: Mapping[str, int],
    after_batch: int,
    upto_batch: int,
    batches_max: int,
) -> Compaction:
    """Plan the deletion of logged batches after `after_batch` up to `upto_batch` (at most `batches_max` considered)
    that hold ops of messages only, each op at or below its device's seq in `safe` (what every trusted device has).
    `cursors` name, per device with logged ops, the seq_first from which its runs are read (compaction_scope's, then
    the last plan's).

    Batches with ops of other collections stay: a start replays them (logged_ops_besides_messages). Reads only: the
    caller raises the log's bases before `compact_log` deletes, so no reader is sent to a run being deleted.
    """
    candidates = [
        batch
        for (batch,) in adapter.query(
            "SELECT id FROM op_batches WHERE other_ops = 0 AND id > ? AND id <= ? ORDER BY id LIMIT ?",
            (after_batch, upto_batch, batches_max),
        )
    ]
    if not candidates:
        return Compaction((), (), {}, 0, after_batch, dict(cursors))
    last = candidates[-1]
    # A device's runs go up in batch id as they go up in seq (its ops are applied in seq order): read from where the
    # last plan stopped to the first run past these candidates, each run is read once in a whole compaction, however
    # long a device's ops have waited for a device that lacks them.
    read: dict[str, list[tuple[int, int, int, int]]] = {}
    next_cursors: dict[str, int] = {}
    for device, cursor in cursors.items():
        read[device], next_cursors[device] = _runs_through(adapter, device, cursor, last)
    unsafe = {batch for device, rows in read.items() for _, seq_last, batch, _ in rows if seq_last > safe.get(device, 0)}
    deleted = set(candidates) - unsafe
    runs: list[tuple[str, int]] = []
    bases: dict[str, int] = {}
    hlc_max = 0
    for device, rows in read.items():
        for seq_first, seq_last, batch, hlc in rows:
            if batch in deleted:
                runs.append((device, seq_first))
                bases[device] = max(bases.get(device, 0), seq_last)
                hlc_max = max(hlc_max, hlc or 0)
    return Compaction(sorted(deleted), runs, bases, hlc_max, last, next_cursors)


def _runs_through(
    adapter: SqlAdapter, device: str, seq_first: int, last_batch: int
) -> tuple[list[tuple[int, int, int, int]], int]:
    """Return (seq_first, seq_last, batch, hlc_max) of a device's runs from `seq_first` on, in seq order, while their
    batch is at most `last_batch`; and the seq_first to read on from."""
    rows: list[tuple[int, int, int, int]] = []
    after = seq_first - 1
    while page := adapter.query(
        "SELECT seq_first, seq_last, batch, hlc_max FROM op_runs WHERE device = ? AND seq_first > ? "
        "ORDER BY seq_first LIMIT ?",
        (device, after, RUNS_SCAN_PAGE),
    ):
        for row in page:
            if row[2] > last_batch:
                return rows, row[0]
            rows.append(row)
        after = page[-1][0]
    return rows, after + 1


def compact_log(adapter: SqlAdapter, compaction: Compaction) -> None:
    """Delete the planned batches and their runs, raising the bases and keeping their newest HLC, in one transaction;
    the derived-store updates that batches not yet projected owe go to the outbox."""
    with adapter.transaction():
        projected_batch = _projected_batch(adapter)
        owed = logged_bodies(adapter, [batch for batch in compaction.batches if batch > projected_batch])
        _queue_projections(adapter, _logged_projections(map(stored_batch_keys, owed.values())))
        _delete_where_in(adapter, "DELETE FROM op_batches WHERE id IN", list(compaction.batches))
        adapter.executemany("DELETE FROM op_runs WHERE device = ? AND seq_first = ?", list(compaction.runs))
        _raise_bases(adapter, compaction.bases)
        if compaction.hlc_max > (get_meta(adapter, CLOCK_LAST) or 0):
            set_meta(adapter, CLOCK_LAST, compaction.hlc_max)


_UPSERT_SQL = {
    Collection.PREFERENCES: "INSERT OR REPLACE INTO preferences (collection, key, value) VALUES",
    Collection.SETTINGS: "INSERT OR REPLACE INTO preferences (collection, key, value) VALUES",
    Collection.MESSAGES: "INSERT OR REPLACE INTO messages "
    "(id, conversation, role, text, ts_ms, sentiment, response_time_ms, add_hlc, add_device, add_seq) VALUES",
    Collection.MEMORIES: "INSERT OR REPLACE INTO memories (id, text, embedding, metadata) VALUES",
    Collection.NOTES: "INSERT OR REPLACE INTO notes (name, text) VALUES",
    Collection.COUNTERS: "INSERT OR REPLACE INTO counters (name, value) VALUES",
    Collection.DEVICES: "INSERT OR REPLACE INTO devices (device, record, revoked) VALUES",
}
_DELETE_SQL = {
    Collection.MESSAGES: "DELETE FROM messages WHERE id IN",
    Collection.MEMORIES: "DELETE FROM memories WHERE id IN",
}
# Which derived stores follow which collection.
_PROJECTED_TO = {Collection.MESSAGES: ANALYTICS, Collection.MEMORIES: VECTORS, Collection.PREFERENCES: CACHE}


def persist(
    adapter: SqlAdapter,
    log: Sequence[LogBatch],
    changes: Changes,
    conflicts: Sequence[Conflict],
    forgotten: Sequence[tuple[Collection, str]] = (),
    meta: dict[str, Any] | None = None,
    bases: Mapping[str, int] | None = None,
    stamp_numbers: dict[str, int] | None = None,
) -> None:
    """Write applied ops, the rows they changed, new conflicts and outbox entries for changes the ops do not name, in
    one transaction, and strip the content of the forgotten keys from the log; raise the log's `bases` (a state
    snapshot brought their ops' effect).

    `stamp_numbers` caches the stamp_devices numbers across writes; it takes the new ones once the write commits.
    """
    stamp_numbers = {} if stamp_numbers is None else stamp_numbers
    numbers: dict[str, int] = {}
    with adapter.transaction():
        _log_batches(adapter, log)
        if bases:
            _raise_bases(adapter, bases)
        _redact_logged(adapter, forgotten)
        counts = _ConversationCounts(adapter, changes)
        for collection, keys in changes.deletes.items():
            _delete_where_in(adapter, _DELETE_SQL[collection], keys)
        for collection, rows in changes.upserts.items():
            upserts = list(rows.values())
            if collection is Collection.MESSAGES:
                numbers = _device_numbers(adapter, {row[8] for row in upserts}, stamp_numbers)
                upserts = [(*row[:8], numbers[row[8]], row[9]) for row in upserts]
            adapter.insert_rows(_UPSERT_SQL[collection], upserts)
        if changes.merged_messages is not None:
            _write_merged_messages(adapter, changes.merged_messages)
        counts.write(adapter)
        # The projector reads the keys of logged ops from the log (log_projections); the outbox names the others: a
        # state snapshot's, a rebuild's.
        logged = {(op.collection, op.key) for logged_batch in log for op in logged_batch.ops}
        _queue_projections(
            adapter,
            [
                (target, action, [key for key in keys.get(collection, ()) if (collection, key) not in logged])
                for collection, target in _PROJECTED_TO.items()
                for action, keys in ((UPSERT, changes.upserts), (DELETE, changes.deletes))
            ],
        )
        adapter.insert_rows(
            "INSERT INTO conflicts (collection, key, field, winner_device, winner_seq, winner_value, "
            "loser_device, loser_seq, loser_value) VALUES",
            [
                (str(c.collection), c.key, c.field, *c.winner, pack(c.winner_value), *c.loser, pack(c.loser_value))
                for c in conflicts
            ],
        )
        for name, value in (meta or {}).items():
            set_meta(adapter, name, value)
    stamp_numbers |= numbers


def _device_numbers(adapter: SqlAdapter, devices: AbstractSet[str], known: Mapping[str, int]) -> dict[str, int]:
    """Return the number each device has in message rows (stamp_devices), numbering those new to it; the `known`
    numbers (committed ones: a number never changes) are not read again."""
    numbers = {device: known[device] for device in devices if device in known}
    unknown = [device for device in devices if device not in numbers]
    select = "SELECT device, number FROM stamp_devices WHERE device IN"
    numbers |= dict(_rows_where_in(adapter, select, (), unknown))
    if new := [device for device in unknown if device not in numbers]:
        adapter.insert_rows("INSERT INTO stamp_devices (device) VALUES", [(device,) for device in new])
        numbers |= dict(_rows_where_in(adapter, select, (), new))
    return numbers


def _write_merged_messages(adapter: SqlAdapter, merged: MergedMessages) -> None:
    cleared = list(merged.cleared)
    _delete_where_in(adapter, "DELETE FROM message_edits WHERE id IN", cleared)
    _delete_where_in(adapter, "DELETE FROM message_tombstones WHERE id IN", cleared)
    adapter.insert_rows("INSERT OR REPLACE INTO message_edits VALUES", merged.edits)
    adapter.insert_rows("INSERT OR REPLACE INTO message_tombstones VALUES", merged.tombstones)


def store_merged_messages(
    adapter: SqlAdapter, stamps: Sequence[tuple], merged: MergedMessages, other_ops: dict[int, int], clock_last: int
) -> None:
    """Write the merge state of every message, replayed from the log, into a home from before it was stored: each row's
    add stamp ((hlc, device, seq, id) per message), the edits and tombstones, each batch's count of ops of other
    collections and the newest HLC; then mark the home as holding it (MESSAGES_MERGED)."""
    with adapter.transaction():
        numbers = _device_numbers(adapter, {device for _, device, _, _ in stamps}, {})
        adapter.executemany(
            "UPDATE messages SET add_hlc = ?, add_device = ?, add_seq = ? WHERE id = ?",
            [(hlc, numbers[device], seq, message_id) for hlc, device, seq, message_id in stamps],
        )
        _write_merged_messages(adapter, merged)
        adapter.executemany(
            "UPDATE op_batches SET other_ops = ? WHERE id = ?", [(count, batch) for batch, count in other_ops.items()]
        )
        set_meta(adapter, CLOCK_LAST, clock_last)
        set_meta(adapter, MESSAGES_MERGED, 1)


_STORED_MESSAGES = (
    f"SELECT id, {', '.join(MESSAGE_ROW_FIELDS)}, add_hlc, stamp_devices.device, add_seq FROM messages "
    "JOIN stamp_devices ON stamp_devices.number = messages.add_device WHERE"
)


def stored_messages(adapter: SqlAdapter, ids: Sequence[str]) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """Return, of these messages, the rows (id, the row fields, add hlc, device, seq), the edits and the tombstones."""
    # A probe costs about 0.45 us an id even of an empty table (the IN list is sorted into a B-tree first): most homes
    # have no edit or delete, and a catch-up probes every message it is sent.
    any_edits, any_tombstones = _one_row(
        adapter, "SELECT EXISTS (SELECT 1 FROM message_edits), EXISTS (SELECT 1 FROM message_tombstones)"
    )
    return (
        _rows_where_in(adapter, f"{_STORED_MESSAGES} id IN", (), ids),
        _rows_where_in(adapter, "SELECT * FROM message_edits WHERE id IN", (), ids) if any_edits else [],
        _rows_where_in(adapter, "SELECT * FROM message_tombstones WHERE id IN", (), ids) if any_tombstones else [],
    )


def stored_messages_between(adapter: SqlAdapter, after_id: str, upto_id: str) -> tuple[list[tuple], ...]:
    """Return, of the messages with an id above `after_id` and up to `upto_id`, what `stored_messages` returns."""
    # A range is read along each table's key: 4.9 ms for 2000 messages of a 1M home, against 7.8 ms looking them up by id.
    between = "id > ? AND id <= ? ORDER BY id"
    return tuple(
        adapter.query(f"{select} {between}", (after_id, upto_id))
        for select in (_STORED_MESSAGES, "SELECT * FROM message_edits WHERE", "SELECT * FROM message_tombstones WHERE")
    )


def message_ids_after(adapter: SqlAdapter, after_id: str, ids_max: int) -> list[str]:
    """Return up to `ids_max` of the lowest ids above `after_id` of messages with any merge state: a row, an edit (which
    may arrive before its add) or a tombstone."""
    return [
        message_id
        for (message_id,) in adapter.query(
            "SELECT id FROM messages WHERE id > ?1 UNION SELECT id FROM message_edits WHERE id > ?1 "
            "UNION SELECT id FROM message_tombstones WHERE id > ?1 ORDER BY 1 LIMIT ?2",
            (after_id, ids_max),
        )
    ]


def message_ids_count(adapter: SqlAdapter, after_id: str) -> int:
    """Return how many messages, live or deleted, have an id above `after_id` (an edit without its add is not
    counted)."""
    (count,) = _one_row(
        adapter,
        "SELECT (SELECT count(*) FROM messages WHERE id > ?1) "
        "+ (SELECT count(*) FROM message_tombstones WHERE id > ?1)",
        (after_id,),
    )
    return count


def message_columns_after(adapter: SqlAdapter, after_rowid: int, columns: str, rows_max: int) -> list[tuple]:
    """Return (rowid, the columns) of up to `rows_max` messages after `after_rowid`, in rowid order."""
    return adapter.query(
        f"SELECT rowid, {columns} FROM messages WHERE rowid > ? ORDER BY rowid LIMIT ?", (after_rowid, rows_max)
    )


def message_rows_after(adapter: SqlAdapter, after_id: str, rows_max: int) -> list[tuple]:
    """Return up to `rows_max` messages' (id, the row fields) with an id above `after_id`, ids ascending."""
    return adapter.query(
        f"SELECT id, {', '.join(MESSAGE_ROW_FIELDS)} FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after_id, rows_max)
    )


class _ConversationCounts:
    """How one write changes each conversation's message count and latest ts_ms, found from the changed messages alone.

    Recounting whole conversations cost a scan of all their messages per write, so every write slowed as history grew
    (an import of 1M messages spent about a quarter of its time there).
    """

    def __init__(self, adapter: SqlAdapter, changes: Changes) -> None:
        """Read, before the write, where the messages it deletes or replaces were counted."""
        upserts = changes.upserts.get(Collection.MESSAGES, {})
        deletes = changes.deletes.get(Collection.MESSAGES, [])
        stored_ids = [*deletes, *(message_id for message_id in upserts if message_id not in changes.unstored_messages)]
        rows = rows_by_id(adapter, "messages", "id, conversation, ts_ms", stored_ids)
        stored = {message_id: (conversation, ts_ms) for message_id, conversation, ts_ms in rows}
        self.joining: dict[str, list[int]] = {}  # conversation -> [messages that join it, their latest ts_ms]
        self.leaving: dict[str, int] = {}  # conversation -> messages that leave it
        for message_id in deletes:
            if message_id in stored:
                self._leave(stored[message_id][0])
        for message_id, row in upserts.items():
            before, after = stored.get(message_id), (row[1], row[4])
            if before == after:
                continue  # an edit of a counted message
            if before is not None:
                self._leave(before[0])
            joined = self.joining.setdefault(after[0], [0, after[1]])
            joined[0] += 1
            joined[1] = max(joined[1], after[1])

    def _leave(self, conversation: str) -> None:
        self.leaving[conversation] = self.leaving.get(conversation, 0) + 1

    def write(self, adapter: SqlAdapter) -> None:
        """Update the counts once the messages are written; a conversation left with no message goes."""
        # Many rows to a statement, as SqlAdapter.insert_rows says why.
        adapter.insert_rows(
            "INSERT INTO conversations (id, message_count, last_ts_ms) VALUES",
            [(conversation, count, last_ts_ms) for conversation, (count, last_ts_ms) in self.joining.items()],
            "ON CONFLICT (id) DO UPDATE SET message_count = message_count + excluded.message_count, "
            "last_ts_ms = max(last_ts_ms, excluded.last_ts_ms)",
        )
        # The latest of what is left, by the (conversation, ts_ms) index: one B-tree descent, not a scan.
        adapter.executemany(
            "UPDATE conversations SET message_count = message_count - ?, "
            "last_ts_ms = coalesce((SELECT max(ts_ms) FROM messages WHERE conversation = conversations.id), 0) WHERE id = ?",
            [(count, conversation) for conversation, count in self.leaving.items()],
        )
        _delete_where_in(adapter, "DELETE FROM conversations WHERE message_count <= 0 AND id IN", list(self.leaving))


def outbox_batch(adapter: SqlAdapter, keys_max: int) -> list[OutboxEntry]:
    """Return the oldest outbox entries, as many as name about `keys_max` keys (at least one entry)."""
    entries: list[OutboxEntry] = []
    keys, after_id = 0, 0
    # A few rows at a time: a row's key_count sits behind its keys (in overflow pages), so every row read costs all its
    # keys. Reading keys_max rows for a batch of four made a 1M-op catch-up's projector spend 25 s here.
    while keys < keys_max:
        rows = adapter.query(
            "SELECT id, target, action, keys, key_count FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, OUTBOX_PAGE_ROWS),
        )
        for entry_id, target, action, packed, key_count in rows:
            entries.append(OutboxEntry(entry_id, target, action, tuple(unpack(packed))))
            keys, after_id = keys + key_count, entry_id
            if keys >= keys_max:
                break
        if len(rows) < OUTBOX_PAGE_ROWS:
            break
    return entries


def outbox_done(adapter: SqlAdapter, up_to_id: int) -> None:
    adapter.execute("DELETE FROM outbox WHERE id <= ?", (up_to_id,))


def projections_clear(adapter: SqlAdapter) -> None:
    """Drop every derived-store update owed, in the outbox and by the log (for a rebuild of every derived store)."""
    with adapter.transaction():
        adapter.execute("DELETE FROM outbox")
        set_meta(adapter, PROJECTED_BATCH, _newest_batch(adapter))


def log_projections(adapter: SqlAdapter, ops_max: int, messages: bool = True) -> tuple[int, list[OutboxEntry]]:
    """Return the newest logged batch read, and the derived-store updates owed by the batches logged after the
    projector's place (PROJECTED_BATCH), read until they hold `ops_max` ops; (0, []) if there are none. Unless
    `messages`, batches of messages alone owe nothing and are passed over unread.

    Every key the ops wrote comes as an upsert: the projector deletes what has no row (it reads every row it projects).
    """
    after = _projected_batch(adapter)
    if messages:
        pages = _logged_decoded(adapter, after, ops_max, stored_batch_keys)
        upto = pages[-1][0] if pages else after
    else:
        pages = [(batch, stored_batch_keys(body)) for batch, body in _logged_rows_besides_messages(adapter, after)]
        upto = pages[-1][0] if len(pages) == LOG_PAGE_BATCHES else _newest_batch(adapter)
    if upto <= after:
        return 0, []
    projections = _logged_projections(keys for _, keys in pages)
    return upto, [OutboxEntry(upto, target, action, tuple(keys)) for target, action, keys in projections]


def projected(adapter: SqlAdapter, upto_batch: int) -> None:
    """Record that the derived stores hold the effect of every logged batch up to `upto_batch`."""
    set_meta(adapter, PROJECTED_BATCH, upto_batch)


def projector_backlog(adapter: SqlAdapter) -> int:
    """Return how many key updates the derived stores are owed: those in the outbox, and one per logged op after the
    projector's place."""
    (backlog,) = _one_row(
        adapter,
        "SELECT (SELECT coalesce(sum(key_count), 0) FROM outbox) "
        "+ (SELECT coalesce(sum(seq_last - seq_first + 1), 0) FROM op_runs WHERE batch > ?)",
        (_projected_batch(adapter),),
    )
    return backlog


def _projected_batch(adapter: SqlAdapter) -> int:
    """Return the projector's place in the log (PROJECTED_BATCH; 0 before any)."""
    return get_meta(adapter, PROJECTED_BATCH) or 0


def _logged_projections(batches: Iterable[Sequence[tuple[Collection, str]]]) -> list[tuple[str, str, list[str]]]:
    """Return the (target, UPSERT, keys) projections that logged ops owe, given the (collection, key) each wrote, each
    key once."""
    keys: dict[str, dict[str, None]] = {}
    for written in batches:
        for collection, key in written:
            if (target := _PROJECTED_TO.get(collection)) is not None:
                keys.setdefault(target, {})[key] = None
    return [(target, UPSERT, list(target_keys)) for target, target_keys in keys.items()]


def rows_by_id(adapter: SqlAdapter, table: str, columns: str, ids: Iterable[str]) -> list[tuple]:
    """Return rows of a materialised table (keyed by `id`) for the given ids."""
    return _rows_where_in(adapter, f"SELECT {columns} FROM {table} WHERE id IN", (), ids)


def memory_vectors(adapter: SqlAdapter, after_rowid: int, rows_max: int) -> list[tuple[int, str, bytes]]:
    """Return (rowid, id, embedding) of up to `rows_max` memories with an embedding, after `after_rowid`."""
    return adapter.query(
        "SELECT rowid, id, embedding FROM memories WHERE rowid > ? AND embedding IS NOT NULL ORDER BY rowid LIMIT ?",
        (after_rowid, rows_max),
    )


def memory_ids_where(adapter: SqlAdapter, where: Any) -> list[str]:
    """Return the ids of the memories whose metadata matches a checked filter (stores/where.py)."""
    return [memory_id for memory_id, metadata in adapter.query("SELECT id, metadata FROM memories")
            if where_matches(where, unpack(metadata))]  # fmt: skip


def preference_keys(adapter: SqlAdapter) -> list[str]:
    """Return every preference's key."""
    return [key for (key,) in adapter.query("SELECT key FROM preferences WHERE collection = 'preferences'")]


def preference_rows(adapter: SqlAdapter, keys: Iterable[str]) -> list[tuple]:
    """Return (key, packed value) of the given preferences."""
    return _rows_where_in(adapter, "SELECT key, value FROM preferences WHERE collection = ? AND key IN", ("preferences",), keys)


def _rows_where_in(adapter: SqlAdapter, select: str, params: tuple, values: Iterable[str | int]) -> list[tuple]:
    rows: list[tuple] = []
    for chunk, in_list in _in_lists(list(values)):
        rows += adapter.query(f"{select} {in_list}", (*params, *chunk))
    return rows


def _delete_where_in(adapter: SqlAdapter, delete: str, values: Sequence[str | int]) -> None:
    for chunk, in_list in _in_lists(values):
        adapter.execute(f"{delete} {in_list}", chunk)


def _one_row(adapter: SqlAdapter, sql: str, params: tuple = ()) -> tuple:
    """The row a query that always finds one returns."""
    row = adapter.query_one(sql, params)
    assert row is not None, sql
    return row


def _in_lists(values: Sequence[str | int]) -> Iterable[tuple[Sequence[str | int], str]]:
    """Yield the values in chunks of at most 500, each with its "(?,?,...)" for an IN clause."""
    # So no statement exceeds SQLite's limit on bound variables.
    for start in range(0, len(values), 500):
        chunk = values[start : start + 500]
        yield chunk, f"({','.join('?' * len(chunk))})"
