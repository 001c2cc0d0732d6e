"""The node's in-process message bus: topics, non-blocking publish, and subscriptions on trio memory channels."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from node.errors import NodeError

MEMORY_STORE_REQUEST = "memory.store.request"
MEMORY_STORE_COMPLETE = "memory.store.complete"
USER_PREFERENCES_CHANGED = "user.preferences.changed"
CONVERSATION_MESSAGE_ADDED = "conversation.message.added"
DATA_FORGOTTEN = "data.forgotten"
SYNC_REMOTE_APPLIED = "sync.remote.applied"

BUFFER_MAX = 1024
TOPICS_CACHED_MAX = 1024
_TOPIC = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
_WILDCARD = "*"


class BusError(NodeError):
    """A topic or pattern is malformed, or a bus call was used wrongly."""


@attrs.frozen
class BusEvent:
    """One published event; the payload is shared by every subscriber, so treat it as read-only."""

    topic: str
    payload: dict[str, Any]


def _check_topic(topic: str) -> None:
    if type(topic) is not str or not _TOPIC.fullmatch(topic):
        raise BusError(f"a topic is dotted lowercase words like 'memory.store.request', got {topic!r}")


def _check_pattern(pattern: str) -> None:
    if pattern == _WILDCARD:
        return
    if type(pattern) is not str or not _TOPIC.fullmatch(pattern.removesuffix("." + _WILDCARD)):
        raise BusError(f"a pattern is a topic, a topic prefix ending in '.*', or '*', got {pattern!r}")


def _matches(pattern: str, topic: str) -> bool:
    if pattern == _WILDCARD:
        return True
    if pattern.endswith("." + _WILDCARD):
        return topic.startswith(pattern[: -len(_WILDCARD)])
    return topic == pattern


class Subscription:
    """The events matching one pattern, in publish order; `dropped` counts events lost because its buffer was full."""

    def __init__(self, pattern: str, buffer_max: int) -> None:
        self.pattern = pattern
        self.dropped = 0
        self._send, self._receive = trio.open_memory_channel[BusEvent](buffer_max)

    async def receive(self) -> BusEvent:
        """Wait for the next event; raise BusError once the subscription has ended."""
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise BusError(f"the subscription to {self.pattern!r} has ended") from None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> BusEvent:
        try:
            return await self.receive()
        except BusError:
            raise StopAsyncIteration from None

    async def _close(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


class Bus:
    """Routes published events to every subscription whose pattern matches the topic.

    Publishing never blocks: an event for a subscriber whose buffer (`buffer_max` events) is full is dropped for
    that subscriber and counted both in the subscriber's `dropped` and in the bus's `dropped`. Use it from the trio
    thread only.
    """

    def __init__(self, buffer_max: int = BUFFER_MAX) -> None:
        if buffer_max < 1:
            raise BusError(f"buffer_max must be at least 1, got {buffer_max}")
        self.buffer_max = buffer_max
        self.dropped = 0
        self._subscriptions: set[Subscription] = set()
        # A sync publishes an event per op: each topic is checked once, and its subscribers found once until
        # subscriptions change.
        self._subscribers_by_topic: dict[str, list[Subscription]] = {}

    def publish(self, topic: str, payload: dict[str, Any]) -> int:
        """Deliver an event to every matching subscriber without waiting; return how many received it."""
        subscribers = self._subscribers(topic)
        if type(payload) is not dict:
            raise BusError(f"an event payload is a dict, got {type(payload).__name__}")
        if not subscribers:
            return 0
        event = BusEvent(topic, payload)
        delivered = 0
        for subscription in subscribers:
            try:
                subscription._send.send_nowait(event)
            except trio.WouldBlock:
                subscription.dropped += 1
                self.dropped += 1
            else:
                delivered += 1
        return delivered

    def has_subscribers(self, *topics: str) -> bool:
        """Return whether an event published on any of these topics would reach a subscriber."""
        return any(self._subscribers(topic) for topic in topics)

    def _subscribers(self, topic: str) -> list[Subscription]:
        """Return the subscriptions whose pattern matches a well-formed `topic`."""
        subscribers = self._subscribers_by_topic.get(topic) if type(topic) is str else None
        if subscribers is None:
            _check_topic(topic)
            subscribers = [s for s in self._subscriptions if _matches(s.pattern, topic)]
            if len(self._subscribers_by_topic) < TOPICS_CACHED_MAX:
                self._subscribers_by_topic[topic] = subscribers
        return subscribers

    @asynccontextmanager
    async def subscribe(self, pattern: str) -> AsyncIterator[Subscription]:
        """Subscribe to a topic, a prefix like "memory.*", or "*", for the duration of the context."""
        _check_pattern(pattern)
        subscription = Subscription(pattern, self.buffer_max)
        self._subscriptions.add(subscription)
        self._subscribers_by_topic.clear()
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)
            self._subscribers_by_topic.clear()
            await subscription._close()
