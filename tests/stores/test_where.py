"""Metadata filters in Chroma's `where` syntax, evaluated on memories' metadata."""

import pytest

from stores import DataError
from stores.where import check_where, matches

METADATA = {"topic": "pets", "n": 3, "score": 0.5, "flag": True, "tags": ["a", "b"], "note": "x" * 500}


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({"topic": "pets"}, True),
        ({"topic": "food"}, False),
        ({"topic": {"$ne": "food"}}, True),
        ({"missing": {"$ne": 1}}, True),
        ({"missing": 1}, False),
        ({"n": {"$gt": 2}}, True),
        ({"n": {"$gte": 3.5}}, False),
        ({"score": {"$lt": 1}}, True),
        ({"topic": {"$lte": 1}}, False),  # order comparisons hold between numbers only
        ({"flag": 1}, False),  # true is not 1
        ({"flag": True}, True),
        ({"n": {"$in": [1, 3]}}, True),
        ({"n": {"$nin": [1, 3]}}, False),
        ({"tags": ["a", "b"]}, True),  # values the vector index could not hold are matched too
        ({"note": "x" * 500}, True),
        ({"topic": "pets", "n": 4}, False),
        ({"$and": [{"topic": "pets"}, {"n": 3}]}, True),
        ({"$or": [{"topic": "food"}, {"n": {"$lt": 0}}]}, False),
        ({"$or": [{"topic": "food"}, {"$and": [{"n": 3}, {"score": 0.5}]}]}, True),
    ],
)
def test_filters_match_as_chroma_s_syntax_says(where, expected):
    check_where(where)
    assert matches(where, METADATA) is expected


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ({}, "non-empty map"),
        ([1], "non-empty map"),
        ({"$foo": 1}, "unknown where operator"),
        ({"n": {"$gt": "3"}}, "compares with a number"),
        ({"n": {"$gt": 1, "$lt": 5}}, "must be one of"),
        ({"n": {"$in": 3}}, "takes a list"),
        ({"$and": []}, "non-empty list"),
        ({"$or": [{"n": 1}, "x"]}, "non-empty map"),
    ],
)
def test_malformed_filters_are_refused_with_what_is_wrong(where, message):
    with pytest.raises(DataError, match=message):
        check_where(where)


def test_filters_nest_only_so_deep():
    where: dict = {"n": 1}
    for _ in range(40):
        where = {"$and": [where]}
    with pytest.raises(DataError, match="deeper"):
        check_where(where)
