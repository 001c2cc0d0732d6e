"""Metadata filters on memories, in Chroma's `where` syntax, evaluated on the metadata the primary store holds.

A filter is a map: `{"field": value}` (equal), `{"field": {"$op": operand}}` with `$eq $ne $gt $gte $lt $lte $in
$nin`, and `{"$and": [filters]}` / `{"$or": [filters]}`; several entries in one map must all hold. A field a memory
lacks matches only `$ne` and `$nin`. Order comparisons hold between numbers only; `true` never equals `1`.
"""

from collections.abc import Mapping
from typing import Any

from stores.errors import DataError

DEPTH_MAX = 16
_COMPARE = {
    "$gt": lambda value, operand: value > operand,
    "$gte": lambda value, operand: value >= operand,
    "$lt": lambda value, operand: value < operand,
    "$lte": lambda value, operand: value <= operand,
}
_OPERATORS = {"$eq", "$ne", "$in", "$nin", *_COMPARE}


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _same(a: Any, b: Any) -> bool:
    return (type(a) is bool) == (type(b) is bool) and a == b


def check_where(where: Any, depth: int = 0) -> None:
    """Raise DataError naming what is wrong if `where` is not a well-formed filter."""
    if depth > DEPTH_MAX:
        raise DataError(f"where filter nests deeper than {DEPTH_MAX} levels")
    if not isinstance(where, Mapping) or not where:
        raise DataError(f"a where filter is a non-empty map, got {where!r:.80}")
    for name, condition in where.items():
        if name in ("$and", "$or"):
            if not isinstance(condition, list) or not condition:
                raise DataError(f"{name} takes a non-empty list of filters")
            for part in condition:
                check_where(part, depth + 1)
        elif not isinstance(name, str) or name.startswith("$"):
            raise DataError(f"unknown where operator {name!r:.40}; fields are named without a leading $")
        elif isinstance(condition, Mapping):
            if len(condition) != 1 or next(iter(condition)) not in _OPERATORS:
                raise DataError(f"the condition on {name!r:.40} must be one of {', '.join(sorted(_OPERATORS))}")
            ((operator, operand),) = condition.items()
            if operator in _COMPARE and not _is_number(operand):
                raise DataError(f"{operator} on {name!r:.40} compares with a number, got {operand!r:.40}")
            if operator in ("$in", "$nin") and not isinstance(operand, list):
                raise DataError(f"{operator} on {name!r:.40} takes a list")


def matches(where: Mapping[str, Any], metadata: Mapping[str, Any]) -> bool:
    """Whether a memory's metadata satisfies a filter that `check_where` accepted."""
    for name, condition in where.items():
        if name == "$and":
            held = all(matches(part, metadata) for part in condition)
        elif name == "$or":
            held = any(matches(part, metadata) for part in condition)
        else:
            operator, operand = next(iter(condition.items())) if isinstance(condition, Mapping) else ("$eq", condition)
            held = _holds(operator, operand, name in metadata, metadata.get(name))
        if not held:
            return False
    return True


def _holds(operator: str, operand: Any, present: bool, value: Any) -> bool:
    if operator == "$eq":
        return present and _same(value, operand)
    if operator == "$ne":
        return not (present and _same(value, operand))
    if operator == "$in":
        return present and any(_same(value, item) for item in operand)
    if operator == "$nin":
        return not (present and any(_same(value, item) for item in operand))
    return present and _is_number(value) and _COMPARE[operator](value, operand)
