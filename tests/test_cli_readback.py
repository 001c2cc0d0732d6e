"""Reading back what was written: `msg list`, `memory list`, `pref list`, `note list`, for people and with --json,
through a running node's socket and from the stores directly."""

import json

import numpy as np
import pytest

from tests.processes import RunningNode, cli

DIMS = 384


def _ok(home, *args) -> str:
    done = cli(home, *args, timeout_s=60)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A node's home holding messages, memories, preferences and notes written through the CLI, the node running."""
    root = tmp_path_factory.mktemp("readback")
    home = root / "home"
    _ok(home, "init")
    embedding = root / "tea.npy"
    np.save(embedding, np.random.default_rng(1).standard_normal(DIMS))
    node = RunningNode(home)
    try:
        ids = {
            "first": json.loads(_ok(home, "msg", "add", "chat", "good morning"))["id"],
            "other": json.loads(_ok(home, "msg", "add", "work", "meeting at ten", "--role", "assistant"))["id"],
            "second": json.loads(_ok(home, "msg", "add", "chat", "two lines\nof text", "--sentiment", "0.5"))["id"],
            "tea": json.loads(
                _ok(home, "memory", "add", "likes green tea", "--embedding", str(embedding),
                    "--metadata", '{"topic": "tea", "strength": 2}')  # fmt: skip
            )["id"],
            "walks": json.loads(_ok(home, "memory", "add", "walks at dawn", "--embedding", str(embedding)))["id"],
        }
        _ok(home, "pref", "set", "theme", "dark")
        _ok(home, "pref", "set", "volume", "7")
        _ok(home, "note", "edit", "people", "Ada: likes tea")
        _ok(home, "note", "edit", "plans", "")
        yield node, ids
    finally:
        node.stop()


def test_messages_list_newest_first_per_conversation(written):
    node, ids = written
    messages = json.loads(_ok(node.home, "msg", "list", "chat", "--json"))
    assert [m["id"] for m in messages] == [ids["second"], ids["first"]]
    assert messages[0]["text"] == "two lines\nof text" and messages[0]["sentiment"] == 0.5
    assert set(messages[0]) == {"id", "conversation", "role", "text", "ts_ms", "sentiment", "response_time_ms"}
    assert [m["id"] for m in json.loads(_ok(node.home, "msg", "list", "chat", "--limit", "1", "--json"))] == [
        ids["second"]
    ]
    shown = _ok(node.home, "msg", "list", "chat").splitlines()
    assert len(shown) == 3 and "two lines" in shown[0] and shown[1].strip() == "of text" and "good morning" in shown[2]
    assert "user" in shown[0] and "None" not in "\n".join(shown)
    assert "meeting" in _ok(node.home, "msg", "list", "work") and "assistant" in _ok(node.home, "msg", "list", "work")
    assert _ok(node.home, "msg", "list", "nobody").strip() == "no messages"
    assert json.loads(_ok(node.home, "msg", "list", "nobody", "--json")) == []


def test_memories_list_newest_first_with_ids_and_tags(written):
    node, ids = written
    memories = json.loads(_ok(node.home, "memory", "list", "--json"))
    assert memories == [
        {"id": ids["walks"], "text": "walks at dawn", "metadata": {}},
        {"id": ids["tea"], "text": "likes green tea", "metadata": {"topic": "tea", "strength": 2}},
    ]
    shown = _ok(node.home, "memory", "list").splitlines()
    assert shown[0] == f"{ids['walks']}  walks at dawn"
    assert shown[1] == f'{ids["tea"]}  likes green tea  [topic="tea", strength=2]'
    assert len(json.loads(_ok(node.home, "memory", "list", "--limit", "1", "--json"))) == 1


def test_preferences_and_notes_list(written):
    node, _ = written
    assert json.loads(_ok(node.home, "pref", "list", "--json")) == {"theme": "dark", "volume": 7}
    assert _ok(node.home, "pref", "list").splitlines() == ['theme   "dark"', "volume  7"]
    assert json.loads(_ok(node.home, "note", "list", "--json")) == ["people", "plans"]
    assert _ok(node.home, "note", "list").splitlines() == ["people", "plans"]
    assert json.loads(_ok(node.home, "note", "show", "people", "--json")) == "Ada: likes tea"


def test_the_lists_read_the_stores_directly_when_no_node_runs(written):
    node, ids = written
    through_socket = {
        args: _ok(node.home, *args) for args in (("pref", "list", "--json"), ("msg", "list", "chat", "--json"))
    }
    node.stop()
    for args, shown in through_socket.items():
        assert json.loads(_ok(node.home, *args)) == json.loads(shown)
    assert _ok(node.home, "note", "list").splitlines() == ["people", "plans"]
