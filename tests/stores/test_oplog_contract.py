"""One contract for every op log (crdt/oplog.py): the in-memory log and the primary store's, on the real engines."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from crdt import Collection, HybridClock, MemoryLog, Op, Replica
from stores import open_sql, primary
from stores.oplog import DECODE_STEP_OPS, DECODED_BATCHES_MAX, RUNS_PAGE, SqlLog
from stores.primary import Changes, LogBatch

KEY = bytes(range(32))
SECRET = "zebra-plaintext-canary-4711"


class _Memory:
    def __init__(self) -> None:
        self.log = MemoryLog()

    def append(self, ops: list[Op]) -> None:
        for op in ops:
            self.log.append(op)

    def forget(self, collection: Collection, key: str) -> None:
        self.log.redact(collection, key)

    def write(self, batch_ops: int = 3) -> None:
        """Nothing to write: the memory log holds what it holds."""

    def close(self) -> None:
        """Nothing to close."""


class _Sql:
    def __init__(self, engine: str, path: Path) -> None:
        self.writer = open_sql(engine, path, KEY)
        primary.open_schema(self.writer)
        self.log = SqlLog.open(engine, path, KEY)
        self._unwritten: list[Op] = []
        self._forgotten: list[tuple[Collection, str]] = []

    def append(self, ops: list[Op]) -> None:
        for op in ops:
            self.log.append(op)
        self._unwritten += ops

    def forget(self, collection: Collection, key: str) -> None:
        self.log.redact(collection, key)
        self._forgotten.append((collection, key))

    def write(self, batch_ops: int = 3) -> None:
        """Commit the appended ops (in batches of 3 by default, so runs and batches are many) and the forgets, as a
        node does."""
        ops, self._unwritten = self._unwritten, []
        forgotten, self._forgotten = self._forgotten, []
        batches = [LogBatch(ops[start : start + batch_ops]) for start in range(0, len(ops), batch_ops)]
        primary.persist(self.writer, batches, Changes(), [], forgotten)
        self.log.record_written(ops, forgotten)

    def close(self) -> None:
        self.log.close()
        self.writer.close()


@pytest.fixture(params=["memory", "sqlcipher", "libsql"])
def harness(request, tmp_path) -> Iterator[_Memory | _Sql]:
    made = _Memory() if request.param == "memory" else _Sql(request.param, tmp_path / "primary.db")
    yield made
    made.close()


def _ops(count: int) -> list[Op]:
    """Interleaved ops of two devices (messages and preferences), in the order one replica applied them."""
    a, b = Replica("device-a", HybridClock(lambda: 1_000)), Replica("device-b", HybridClock(lambda: 1_000))
    made: list[Op] = []
    for i in range(count):
        writer = a if i % 3 else b
        if i % 2:
            fields = {"conversation": "c", "role": "user", "text": f"{SECRET} {i}", "ts_ms": i}
            made.append(writer.add_message(f"m{i}", fields))
        else:
            made.append(writer.set_preference(f"k{i}", i))
    return made


def _of(ops: list[Op], device: str, after_seq: int = 0) -> list[Op]:
    return [op for op in ops if op.device == device and op.seq > after_seq]


def test_a_tail_gives_a_devices_ops_above_a_seq_whether_written_or_not(harness):
    ops = _ops(120)
    harness.append(ops[:80])
    harness.write()
    harness.append(ops[80:])  # applied, not written yet
    for device in ("device-a", "device-b"):
        for after in (0, 1, 17, 52, len(_of(ops, device)) - 1, len(_of(ops, device))):
            assert list(harness.log.tail(device, after)) == _of(ops, device, after)
    assert list(harness.log.tail("device-c", 0)) == []
    assert sorted(harness.log.ops(), key=lambda op: op.id) == sorted(ops, key=lambda op: op.id)
    harness.write()
    assert list(harness.log.tail("device-a", 30)) == _of(ops, "device-a", 30)


def test_a_tail_spans_more_runs_than_a_page_and_more_batches_than_are_kept_decoded(harness):
    ops = _ops(3 * (RUNS_PAGE + DECODED_BATCHES_MAX) * 4)
    harness.append(ops)
    harness.write()
    assert list(harness.log.tail("device-a", 0)) == _of(ops, "device-a")
    assert list(harness.log.tail("device-b", 5)) == _of(ops, "device-b", 5)


def test_tails_read_in_turns_give_every_op_though_each_evicts_the_batches_the_other_decoded(harness):
    # As a catch-up's merge of several devices' tails reads them: one tail's batches are dropped from the decoded
    # ones while the other still needs them.
    ops = _ops(3 * (RUNS_PAGE + DECODED_BATCHES_MAX) * 4)
    harness.append(ops)
    harness.write()
    tails = {device: harness.log.tail(device, 0) for device in ("device-a", "device-b")}
    read: dict[str, list[Op]] = {device: [] for device in tails}
    while tails:
        for device in list(tails):
            for _ in range(5):
                op = next(tails[device], None)
                if op is None:
                    del tails[device]
                    break
                read[device].append(op)
    assert read == {device: _of(ops, device) for device in read}


def test_a_batch_larger_than_a_decoding_step_is_read_in_steps_from_any_seq(harness):
    ops = _ops(3 * DECODE_STEP_OPS + 10)
    harness.append(ops)
    harness.write(batch_ops=len(ops))  # one batch, as one large unit of work logs it
    # A few ops from its start first: the batch is left decoded in part, and read on from there.
    assert [op for op, _ in zip(harness.log.tail("device-b", 3), range(7))] == _of(ops, "device-b", 3)[:7]
    count_a = len(_of(ops, "device-a"))
    for after in (DECODE_STEP_OPS, 0, count_a - 1, count_a // 2):
        assert list(harness.log.tail("device-a", after)) == _of(ops, "device-a", after)


def test_a_forgotten_key_loses_its_content_in_every_op_read_back_before_and_after_the_write(harness):
    ops = _ops(40)
    harness.append(ops[:30])
    harness.write()
    harness.append(ops[30:])
    doomed = {"m5", "m35"}  # one written, one not
    for key in doomed:
        harness.forget(Collection.MESSAGES, key)
    for _ in range(2):
        read = list(harness.log.ops())
        assert sorted(op.key for op in read if SECRET in repr(op.payload)) == sorted(
            op.key for op in ops if op.collection is Collection.MESSAGES and op.key not in doomed
        )
        assert sorted(op.id for op in read if op.key in doomed) == sorted(op.id for op in ops if op.key in doomed)
        tails = [op for device in ("device-a", "device-b") for op in harness.log.tail(device, 0)]
        assert all(SECRET not in repr(op.payload) for op in tails if op.key in doomed)
        harness.write()


def test_a_reset_keeps_only_what_is_kept_durably(harness):
    ops = _ops(30)
    harness.append(ops[:20])
    harness.write()
    harness.append(ops[20:])
    harness.log.reset()
    kept = ops[:20] if isinstance(harness, _Sql) else []
    assert sorted(harness.log.ops(), key=lambda op: op.id) == sorted(kept, key=lambda op: op.id)
    assert list(harness.log.tail("device-a", 0)) == _of(kept, "device-a")
    harness.append(ops[:20])  # a replica rebuilt from the store replays what it kept: held once, not twice
    assert list(harness.log.tail("device-a", 0)) == _of(ops[:20], "device-a")
