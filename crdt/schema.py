"""What a well-formed payload of each (collection, kind) looks like; shared by local writes and decoding."""

from collections.abc import Callable, Mapping
from typing import Any

from crdt.memories import EDITABLE_FIELDS as MEMORY_FIELDS
from crdt.messages import EDITABLE_FIELDS as MESSAGE_FIELDS
from crdt.messages import ROW_FIELDS as MESSAGE_ROW_FIELDS
from crdt.ops import KINDS_BY_COLLECTION, Collection, Kind
from crdt.revocation import CUTOFF_FIELD

SEQ_MAX = (1 << 63) - 1


def is_int(value: Any, low: int = 0, high: int = SEQ_MAX) -> bool:
    return type(value) is int and low <= value <= high


_NUMBER_TYPES = (int, float)


def _is_number_or_none(value: Any) -> bool:
    return value is None or type(value) in _NUMBER_TYPES


def is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(type(k) is str for k in value)


_MESSAGE_FIELD_TYPES: dict[str, Callable[[Any], bool]] = {
    "conversation": lambda v: type(v) is str,
    "role": lambda v: type(v) is str,
    "text": lambda v: type(v) is str,
    "ts_ms": lambda v: is_int(v),
    "sentiment": _is_number_or_none,
    "response_time_ms": _is_number_or_none,
}
_MEMORY_FIELD_TYPES: dict[str, Callable[[Any], bool]] = {
    "text": lambda v: type(v) is str,
    "embedding": lambda v: v is None or (type(v) is bytes and len(v) % 4 == 0),
    "metadata": is_str_map,
}
_MESSAGE_FIELDS = frozenset(MESSAGE_ROW_FIELDS)  # conversation, role, text and ts_ms are required
assert _MESSAGE_FIELD_TYPES.keys() == _MESSAGE_FIELDS


def _valid_message(payload: Any) -> bool:
    # On the catch-up hot path: the field checks of _MESSAGE_FIELD_TYPES written out, and no separate key-type pass
    # (only str keys can be a subset). A required field that is missing reads as None, which fails its type check.
    if type(payload) is not dict or not payload.keys() <= _MESSAGE_FIELDS:
        return False
    conversation, role, text, ts_ms, sentiment, response_time_ms = map(payload.get, MESSAGE_ROW_FIELDS)
    return (
        type(conversation) is str
        and type(role) is str
        and type(text) is str
        and type(ts_ms) is int
        and 0 <= ts_ms <= SEQ_MAX
        and (sentiment is None or type(sentiment) in _NUMBER_TYPES)
        and (response_time_ms is None or type(response_time_ms) in _NUMBER_TYPES)
    )


def _valid_field_edit(field_types: Mapping[str, Callable[[Any], bool]], editable: frozenset[str]) -> Callable[[Any], bool]:
    def valid(payload: Any) -> bool:
        return (
            type(payload) is list
            and len(payload) == 2
            and type(payload[0]) is str  # a list or map here is unhashable: not a field name
            and payload[0] in editable
            and field_types[payload[0]](payload[1])
        )

    return valid


def _valid_memory(payload: Any) -> bool:
    return is_str_map(payload) and payload.keys() == _MEMORY_FIELD_TYPES.keys() and all(
        _MEMORY_FIELD_TYPES[f](v) for f, v in payload.items()
    )


def _valid_tags(payload: Any) -> bool:
    return type(payload) is list and all(
        type(t) is list and len(t) == 2 and type(t[0]) is str and is_int(t[1], 1) for t in payload
    )


def _valid_revocation(payload: Any) -> bool:
    return is_str_map(payload) and (CUTOFF_FIELD not in payload or is_int(payload[CUTOFF_FIELD]))


def _valid_totals(payload: Any) -> bool:
    return type(payload) is list and len(payload) == 2 and all(is_int(v) for v in payload)


# Each (collection, kind) an op may have, and whether a payload is well formed for it.
PAYLOAD_RULES: dict[tuple[Collection, Kind], Callable[[Any], bool]] = {
    (Collection.PREFERENCES, Kind.SET): lambda v: True,
    (Collection.SETTINGS, Kind.SET): lambda v: True,
    (Collection.MESSAGES, Kind.ADD): _valid_message,
    (Collection.MESSAGES, Kind.EDIT): _valid_field_edit(_MESSAGE_FIELD_TYPES, MESSAGE_FIELDS),
    (Collection.MESSAGES, Kind.DELETE): lambda v: v is None,
    (Collection.MEMORIES, Kind.ADD): _valid_memory,
    (Collection.MEMORIES, Kind.EDIT): _valid_field_edit(_MEMORY_FIELD_TYPES, MEMORY_FIELDS),
    (Collection.MEMORIES, Kind.REMOVE): _valid_tags,
    (Collection.NOTES, Kind.UPDATE): lambda v: type(v) is bytes,
    (Collection.COUNTERS, Kind.ADD): _valid_totals,
    (Collection.DEVICES, Kind.ENROL): is_str_map,
    (Collection.DEVICES, Kind.REVOKE): _valid_revocation,
}
assert PAYLOAD_RULES.keys() == {(c, k) for c, kinds in KINDS_BY_COLLECTION.items() for k in kinds}


def payload_is_valid(collection: Collection, kind: Kind, payload: Any) -> bool:
    """Return whether a payload is well formed for its collection and kind."""
    return PAYLOAD_RULES[collection, kind](payload)


_NEUTRAL_MESSAGE_FIELDS = {"text": "", "role": "", "sentiment": None, "response_time_ms": None}
_NEUTRAL_MEMORY: dict[str, Any] = {"text": "", "embedding": None, "metadata": {}}


def redacted_payload(collection: Collection, kind: Kind, payload: Any) -> Any:
    """Return a payload of the same kind with every piece of user content replaced by a neutral value."""
    if collection is Collection.MESSAGES and kind is Kind.ADD:
        return {**payload, "text": ""}
    if collection is Collection.MESSAGES and kind is Kind.EDIT:
        return [payload[0], _NEUTRAL_MESSAGE_FIELDS[payload[0]]]
    if collection is Collection.MEMORIES and kind is Kind.ADD:
        return dict(_NEUTRAL_MEMORY)
    if collection is Collection.MEMORIES and kind is Kind.EDIT:
        return [payload[0], _NEUTRAL_MEMORY[payload[0]]]
    return payload
