"""`aico-node import FILE.jsonl`: history stored once whatever how often it is imported, bad lines refused before
anything is stored, and an interrupted import finished by running it again."""

import hashlib
import json
import signal
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.api.params import checked_import_record
from node.api.rpc import RpcRemoteError
from tests.processes import RunningNode, cli, env, wait_until

DIMS = 384


def _message(number: int) -> dict:
    return {"type": "message", "conversation": f"chat-{number % 3}", "text": f"line {number}", "role": "user",
            "ts_ms": 1_700_000_000_000 + number * 1000, "sentiment": 0.25, "response_time_ms": 120}  # fmt: skip


def _write(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _ok(home, *args) -> str:
    done = cli(home, *args, timeout_s=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout


def _counts(home) -> dict:
    return json.loads(_ok(home, "digest"))["counts"]


def test_an_import_stores_each_kind_once_and_a_second_run_adds_nothing(tmp_path):
    home = tmp_path / "home"
    _ok(home, "init")
    history = tmp_path / "history.jsonl"
    _write(history, [
        *(_message(number) for number in range(2500)),
        {"type": "message", "id": "given-id", "conversation": "chat-0", "text": "mine", "ts_ms": 5},
        {"type": "memory", "text": "likes green tea", "embedding": [0.5] * DIMS, "metadata": {"topic": "tea"}},
        {"type": "preference", "key": "theme", "value": "dark"},
        {"type": "note", "name": "about", "text": "prefers mornings"},
    ])  # fmt: skip
    first = json.loads(_ok(home, "import", str(history), "--json"))
    assert first == {"records": 2504, "added": {"message": 2501, "memory": 1, "preference": 1, "note": 1}, "skipped": 0}
    counts = _counts(home)
    assert (counts["messages"], counts["memories"], counts["preferences"], counts["notes"]) == (2501, 1, 1, 1)
    assert json.loads(_ok(home, "pref", "get", "theme")) == "dark"
    assert _ok(home, "note", "show", "about").strip() == "prefers mornings"
    listed = json.loads(_ok(home, "msg", "list", "chat-0", "--limit", "2", "--json"))
    assert [message["text"] for message in listed] == ["line 2499", "line 2496"]

    again = _ok(home, "import", str(history))
    assert again.strip() == f"imported {history}: 2,504 records, nothing new added; 2,504 already here, skipped"
    assert _counts(home) == counts


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{not json", "line 3: not JSON"),
        ('{"type": "song", "text": "la"}', "line 3: \"type\" is 'song'; it must be one of message, memory"),
        ('{"type": "message", "conversation": "c", "text": "hi"}', "line 3: a message needs ts_ms"),
        ('{"type": "message", "conversation": "c", "text": "hi", "ts_ms": 1, "mood": 2}', "line 3: a message has no field 'mood'"),
        ('{"type": "memory", "text": "x", "embedding": [1, "a"]}', "line 3: a memory's embedding is a list of numbers"),
        ('{"type": "preference", "value": 1}', "line 3: a preference's key must be a non-empty string"),
        ('["message"]', "line 3: a record is a JSON object"),
    ],
)  # fmt: skip
def test_a_bad_line_is_named_and_nothing_is_stored(tmp_path, line, says):
    home = tmp_path / "home"
    _ok(home, "init")
    history = tmp_path / "history.jsonl"
    history.write_text(json.dumps(_message(1)) + "\n\n" + line + "\n" + json.dumps(_message(2)) + "\n")
    done = cli(home, "import", str(history))
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 2
    assert _counts(home)["messages"] == 0


def _ctrl_c_as_in_a_terminal() -> None:
    """Let the command take SIGINT as a terminal's foreground process does: a shell starts a background job (as a CI
    runner may start the tests) with SIGINT ignored, and every process below it inherits that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_an_interrupted_import_through_a_running_node_is_finished_by_running_it_again(tmp_path):
    home = tmp_path / "home"
    _ok(home, "init")
    total = 60_000
    history = tmp_path / "history.jsonl"
    _write(history, (_message(number) for number in range(total)))
    node = RunningNode(home)
    try:
        importing = subprocess.Popen(
            [sys.executable, "-m", "cli", "--home", str(home), "import", str(history)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), stdin=subprocess.DEVNULL,
            preexec_fn=_ctrl_c_as_in_a_terminal,
        )  # fmt: skip
        wait_until(lambda: node.call("digest")["counts"]["messages"] >= 2000, timeout_s=120, what="a few batches")
        importing.send_signal(signal.SIGINT)
        _, said = importing.communicate(timeout=60)
        assert importing.returncode == 130 and "run the same command again" in said, said
        stored = node.call("digest")["counts"]["messages"]
        assert stored < total, "the import finished before it was interrupted; make the file larger"

        done = json.loads(_ok(home, "import", str(history), "--json"))
        assert done["added"]["message"] == total - stored and done["skipped"] == stored
        assert node.call("digest")["counts"]["messages"] == total
    finally:
        node.stop()


def test_a_batch_with_a_bad_record_sent_to_the_socket_is_refused_whole(tmp_path):
    home = tmp_path / "home"
    _ok(home, "init")
    node = RunningNode(home)
    try:
        bad = {"type": "message", "conversation": "c", "text": "hi", "ts_ms": -1}
        with pytest.raises(RpcRemoteError, match="record 2 of the batch: a message needs ts_ms"):
            node.call("import.batch", records=[_message(1), bad])
        with pytest.raises(RpcRemoteError, match="records must be a list of 1 to 5000"):
            node.call("import.batch", records=[_message(number) for number in range(5001)])
        assert node.call("digest")["counts"]["messages"] == 0
        assert node.call("import.batch", records=[_message(1)])["added"]["message"] == 1
    finally:
        node.stop()


@settings(max_examples=300, deadline=None)
@given(
    names=st.lists(st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20), min_size=2, max_size=2),
    text=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
    ts_ms=st.integers(0, (1 << 48) - 1),
    sentiment=st.none() | st.integers(-1, 1) | st.floats(-1, 1),
    response_time_ms=st.none() | st.integers(0, 1 << 60) | st.floats(0, 1e300),
)
def test_a_message_id_is_the_hash_of_the_json_of_its_content(names, text, ts_ms, sentiment, response_time_ms):
    # Ids must not change between versions, or a file imported again after an upgrade would be stored twice.
    record = checked_import_record({"type": "message", "conversation": names[0], "role": names[1], "text": text,
                                    "ts_ms": ts_ms, "sentiment": sentiment, "response_time_ms": response_time_ms})  # fmt: skip
    content = {name: value for name, value in record.items() if name != "id"}
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    assert record["id"] == f"{ts_ms:012x}{hashlib.blake2b(canonical, digest_size=10).hexdigest()}"
