"""The checks on what a caller hands the node: names, texts and metadata, shared by the RPC handlers and the CLI.

This module imports nothing heavy, so the command line can check its input before it opens a store or the socket.
"""

import hashlib
import json
import math
import re
from json.encoder import encode_basestring
from typing import Any

from node.errors import NodeError

NAME_CHARS_MAX = 256
"""Conversation ids, note names, preference keys: short labels, never texts."""

TEXT_BYTES_MAX = 512 * 1024
"""A message's, memory's or note's text in UTF-8: half the CRDT's 1 MiB value limit (crdt/replica.py), so the text,
its embedding and metadata fit in one op."""

METADATA_KEYS_MAX = 32
METADATA_VALUE_CHARS_MAX = 64
"""The vector store keeps metadata in plain SQLite, so text values are short tags (stores/vectors.py
METADATA_TEXT_MAX_CHARS), never texts."""


# Unicode's control characters (category Cc) are exactly these two ranges; a regex finds one at C speed.
_CONTROL_CHAR = re.compile("[\x00-\x1f\x7f-\x9f]")


class ParamError(NodeError):
    """A request parameter the node refuses: missing, of the wrong type, empty, too long, or malformed."""

    rpc_error_type = "bad_request"


def checked_name(value: object, what: str) -> str:
    """`value` as a name: a non-empty string of at most NAME_CHARS_MAX characters without control characters."""
    if not isinstance(value, str) or not value:
        raise ParamError(f"{what} must be a non-empty string")
    if len(value) > NAME_CHARS_MAX:
        raise ParamError(f"{what} has {len(value)} characters; at most {NAME_CHARS_MAX} are allowed")
    if _CONTROL_CHAR.search(value):
        raise ParamError(f"{what} {value!r} holds a control character (a newline or tab); remove it")
    return value


def checked_text(value: object, what: str, *, empty_ok: bool = False) -> str:
    """`value` as a text: a (non-empty unless `empty_ok`) string of at most TEXT_BYTES_MAX bytes in UTF-8."""
    if not isinstance(value, str) or (not value and not empty_ok):
        raise ParamError(f"{what} must be a non-empty string")
    # Up to 4 bytes a character in UTF-8: most texts are short enough to need no encoding to know.
    size = 4 * len(value)
    if size > TEXT_BYTES_MAX and (size := len(value.encode("utf-8", "surrogatepass"))) > TEXT_BYTES_MAX:
        raise ParamError(f"{what} has {size} bytes; at most {TEXT_BYTES_MAX} are allowed")
    return value


def checked_metadata(value: object, what: str) -> dict[str, str | int | float | bool]:
    """`value` as memory metadata or a metadata filter: a map of short names to short scalars, naming the wrong key."""
    if not isinstance(value, dict):
        raise ParamError(f'{what} must be a JSON object like {{"topic": "tea"}}, not {_json_kind(value)}')
    if len(value) > METADATA_KEYS_MAX:
        raise ParamError(f"{what} has {len(value)} keys; at most {METADATA_KEYS_MAX} are allowed")
    for key, item in value.items():
        checked_name(key, f"a {what} key")
        if isinstance(item, str):
            if len(item) > METADATA_VALUE_CHARS_MAX:
                raise ParamError(
                    f"{what} {key!r} has {len(item)} characters; values are short tags of at most "
                    f"{METADATA_VALUE_CHARS_MAX} (keep texts in the memory itself)"
                )
        elif isinstance(item, float) and not math.isfinite(item):
            raise ParamError(f"{what} {key!r} must be a finite number")
        elif not isinstance(item, int | float | bool):
            raise ParamError(f"{what} {key!r} must be a string, number or true/false, not {_json_kind(item)}")
    return dict(value)


def _json_kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    for kind, name in kinds.items():
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, int | float) else f"a {type(value).__name__}"


def parsed_json(text: str, what: str) -> Any:
    """The JSON value in `text`, or ParamError saying where it is malformed."""
    try:
        return json.loads(text)
    except ValueError as error:
        raise ParamError(f'{what} is not JSON ({error}); write it like \'{{"topic": "tea"}}\'') from None


IMPORT_KINDS = ("message", "memory", "preference", "note")
IMPORT_LINE_BYTES_MAX = 2 * 1024 * 1024
"""One line of an import file: a text at its limit, an embedding and metadata fit, JSON-escaped."""

IMPORT_BATCH_RECORDS_MAX = 5000
"""Records in one `import.batch` request: one commit each, about 1 MB of messages."""

EMBEDDING_DIMS_MAX = 4096
_IMPORT_FIELDS = {
    "message": {"type", "id", "conversation", "text", "role", "ts_ms", "sentiment", "response_time_ms"},
    "memory": {"type", "id", "text", "embedding", "metadata"},
    "preference": {"type", "key", "value"},
    "note": {"type", "name", "text"},
}


def checked_import_record(value: object, *, with_id: bool = True) -> dict[str, Any]:
    """`value` as one record of history to import, with the id it is stored under (from its content unless given;
    none unless `with_id`, for a check alone)."""
    if not isinstance(value, dict):
        raise ParamError(f"a record is a JSON object with a \"type\", not {_json_kind(value)}")
    kind = value.get("type")
    if kind not in _IMPORT_FIELDS:
        raise ParamError(f"\"type\" is {kind!r}; it must be one of {', '.join(IMPORT_KINDS)}")
    if not value.keys() <= _IMPORT_FIELDS[kind]:
        unknown = sorted(set(value) - _IMPORT_FIELDS[kind])
        raise ParamError(f"a {kind} has no field {unknown[0]!r}; its fields are {', '.join(sorted(_IMPORT_FIELDS[kind]))}")
    if kind == "message":
        record = _checked_message(value, with_id)
    elif kind == "memory":
        record = _checked_memory(value, with_id)
    elif kind == "preference":
        record = {"type": kind, "key": checked_name(value.get("key"), "a preference's key"), "value": value.get("value")}
    else:
        record = {"type": kind, "name": checked_name(value.get("name"), "a note's name"),
                  "text": checked_text(value.get("text"), "a note's text", empty_ok=True)}  # fmt: skip
    return record


def _checked_message(value: dict[str, Any], with_id: bool) -> dict[str, Any]:
    ts_ms = value.get("ts_ms")
    if type(ts_ms) is not int or not 0 <= ts_ms < 1 << 48:
        raise ParamError("a message needs ts_ms: when it was said, in milliseconds since 1970 (an integer)")
    sentiment = value.get("sentiment")
    if sentiment is not None and (not _is_number(sentiment) or not -1.0 <= sentiment <= 1.0):
        raise ParamError("a message's sentiment is a number from -1 to 1, or null")
    response_time_ms = value.get("response_time_ms")
    if response_time_ms is not None and (not _is_number(response_time_ms) or not 0 <= response_time_ms < math.inf):
        raise ParamError("a message's response_time_ms is a number of milliseconds (0 or more), or null")
    record = {
        "type": "message",
        "conversation": checked_name(value.get("conversation"), "a message's conversation"),
        "text": checked_text(value.get("text"), "a message's text"),
        "role": checked_name(value.get("role", "user"), "a message's role"),
        "ts_ms": ts_ms,
        "sentiment": sentiment,
        "response_time_ms": response_time_ms,
    }
    # Ids that grow with time, as new messages' do (stores/repositories.py new_id): the primary key's B-tree grows at
    # its end.
    if with_id:
        record["id"] = _given_id(value) or f"{ts_ms:012x}{_hash_hex(_canonical_message(record), 10)}"
    return record


def _canonical_message(record: dict[str, Any]) -> str:
    """`_canonical(record)` of a checked message, the same text built directly: 5x faster, and an import computes one
    per message."""
    quoted = encode_basestring
    return (
        f'{{"conversation":{quoted(record["conversation"])},"response_time_ms":{_json_number(record["response_time_ms"])},'
        f'"role":{quoted(record["role"])},"sentiment":{_json_number(record["sentiment"])},'
        f'"text":{quoted(record["text"])},"ts_ms":{record["ts_ms"]!r},"type":"message"}}'
    )


def _json_number(value: float | None) -> str:
    """A finite number or None as json.dumps writes it."""
    if value is None:
        return "null"
    return int.__repr__(value) if type(value) is int else float.__repr__(value)


def _checked_memory(value: dict[str, Any], with_id: bool) -> dict[str, Any]:
    embedding = value.get("embedding")
    if embedding is not None and (
        not isinstance(embedding, list)
        or not 0 < len(embedding) <= EMBEDDING_DIMS_MAX
        or not all(_is_number(item) and math.isfinite(item) for item in embedding)
    ):
        raise ParamError("a memory's embedding is a list of numbers (as many as the model's dimensions), or absent")
    record = {
        "type": "memory",
        "text": checked_text(value.get("text"), "a memory's text"),
        "embedding": embedding,
        "metadata": checked_metadata(value.get("metadata", {}), "a memory's metadata"),
    }
    if with_id:
        record["id"] = _given_id(value) or _hash_hex(_canonical(record), 16)
    return record


def _given_id(value: dict[str, Any]) -> str | None:
    given = value.get("id")
    return None if given is None else checked_name(given, "the id")


def _canonical(record: dict[str, Any]) -> str:
    """A record's content as one text: the same line imported again gets the same id, so it is skipped, not doubled."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _hash_hex(canonical: str, digest_bytes: int) -> str:
    return hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=digest_bytes).hexdigest()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
