"""The checks on what a caller hands the node: names, texts and metadata, shared by the RPC handlers and the CLI.

This module imports nothing heavy, so the command line can check its input before it opens a store or the socket.
"""

import json
import math
import unicodedata
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


class ParamError(NodeError):
    """A request parameter the node refuses: missing, of the wrong type, empty, too long, or malformed."""

    rpc_error_type = "bad_request"


def checked_name(value: object, what: str) -> str:
    """`value` as a name: a non-empty string of at most NAME_CHARS_MAX characters without control characters."""
    if not isinstance(value, str) or not value:
        raise ParamError(f"{what} must be a non-empty string")
    if len(value) > NAME_CHARS_MAX:
        raise ParamError(f"{what} has {len(value)} characters; at most {NAME_CHARS_MAX} are allowed")
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise ParamError(f"{what} {value!r} holds a control character (a newline or tab); remove it")
    return value


def checked_text(value: object, what: str, *, empty_ok: bool = False) -> str:
    """`value` as a text: a (non-empty unless `empty_ok`) string of at most TEXT_BYTES_MAX bytes in UTF-8."""
    if not isinstance(value, str) or (not value and not empty_ok):
        raise ParamError(f"{what} must be a non-empty string")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > TEXT_BYTES_MAX:
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
