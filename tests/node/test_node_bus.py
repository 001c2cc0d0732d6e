"""The in-process bus: pattern routing, bounded buffers that drop instead of blocking, and unsubscribing."""

import pytest
import trio

from node.bus import (
    MEMORY_STORE_COMPLETE,
    MEMORY_STORE_REQUEST,
    USER_PREFERENCES_CHANGED,
    Bus,
    BusError,
    BusEvent,
    Subscription,
)


async def next_event(subscription: Subscription) -> BusEvent:
    with trio.fail_after(1):
        return await subscription.receive()


@pytest.mark.trio
async def test_events_fan_out_to_matching_patterns_only() -> None:
    bus = Bus()
    async with (
        bus.subscribe(MEMORY_STORE_REQUEST) as exact,
        bus.subscribe("memory.*") as prefix,
        bus.subscribe("*") as everything,
        bus.subscribe(USER_PREFERENCES_CHANGED) as other,
        bus.subscribe("memory") as parent_topic,
        bus.subscribe("mem.*") as shorter_prefix,
    ):
        assert bus.publish(MEMORY_STORE_REQUEST, {"text": "hi"}) == 3
        assert bus.publish("memoryx.store", {}) == 1  # "memory.*" must not match a longer first word
        # Each subscriber that must not have the first event sees this marker first instead.
        marker = {"marker": True}
        assert bus.publish(USER_PREFERENCES_CHANGED, marker) == 2
        assert bus.publish("memory", marker) == 2
        assert bus.publish("mem.x", marker) == 2

        expected = BusEvent(MEMORY_STORE_REQUEST, {"text": "hi"})
        assert await next_event(exact) == expected
        assert await next_event(prefix) == expected
        assert await next_event(everything) == expected
        assert await next_event(everything) == BusEvent("memoryx.store", {})
        assert await next_event(other) == BusEvent(USER_PREFERENCES_CHANGED, marker)
        assert await next_event(parent_topic) == BusEvent("memory", marker)
        assert await next_event(shorter_prefix) == BusEvent("mem.x", marker)
        assert bus.dropped == 0


@pytest.mark.trio
async def test_async_for_yields_events_in_publish_order_and_ends_on_exit() -> None:
    bus = Bus()
    received: list[int] = []

    async def consume(subscription: Subscription) -> None:
        async for event in subscription:
            received.append(event.payload["n"])

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery, bus.subscribe("memory.*") as subscription:
            nursery.start_soon(consume, subscription)
            for n in range(5):
                bus.publish(MEMORY_STORE_COMPLETE, {"n": n})
            while len(received) < 5:
                await trio.sleep(0.001)
        # Leaving the subscription ended the consumer's loop, so the nursery could close.
    assert received == [0, 1, 2, 3, 4]


@pytest.mark.trio
async def test_a_full_buffer_drops_and_counts_without_blocking_the_publisher() -> None:
    bus = Bus(buffer_max=2)
    with trio.fail_after(1):
        async with bus.subscribe("*") as slow, bus.subscribe("*") as fast:
            delivered = []
            for n in range(5):
                delivered.append(bus.publish(MEMORY_STORE_REQUEST, {"n": n}))
                await next_event(fast)  # the fast subscriber keeps up and loses nothing
            assert delivered == [2, 2, 1, 1, 1]
            assert slow.dropped == 3 and fast.dropped == 0 and bus.dropped == 3
            assert [(await next_event(slow)).payload["n"] for _ in range(2)] == [0, 1]
            assert bus.publish(MEMORY_STORE_REQUEST, {"n": 5}) == 2


@pytest.mark.trio
async def test_leaving_the_context_unsubscribes() -> None:
    bus = Bus()
    async with bus.subscribe("*") as subscription:
        assert bus.publish(MEMORY_STORE_REQUEST, {}) == 1
    assert bus.publish(MEMORY_STORE_REQUEST, {}) == 0
    with pytest.raises(BusError, match="ended"):
        await subscription.receive()
    assert [event async for event in subscription] == []


@pytest.mark.trio
async def test_has_subscribers_says_whether_a_topic_would_reach_anyone() -> None:
    bus = Bus()
    assert not bus.has_subscribers(USER_PREFERENCES_CHANGED, MEMORY_STORE_REQUEST)
    async with bus.subscribe("memory.*"):
        assert not bus.has_subscribers(USER_PREFERENCES_CHANGED)
        assert bus.has_subscribers(USER_PREFERENCES_CHANGED, MEMORY_STORE_REQUEST)
    assert not bus.has_subscribers(MEMORY_STORE_REQUEST)


@pytest.mark.trio
@pytest.mark.parametrize("topic", ["", "Memory.store", "memory..store", "memory.", ".memory", "memory.*", "*", "a b"])
async def test_malformed_topics_are_refused(topic: str) -> None:
    with pytest.raises(BusError):
        Bus().publish(topic, {})


@pytest.mark.trio
@pytest.mark.parametrize("pattern", ["", "memory.*.request", "**", "memory*", "*.request", "Memory.*"])
async def test_malformed_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(BusError):
        async with Bus().subscribe(pattern):
            pass


@pytest.mark.trio
async def test_a_payload_must_be_a_dict() -> None:
    with pytest.raises(BusError, match="dict"):
        Bus().publish(MEMORY_STORE_REQUEST, ["not", "a", "dict"])  # type: ignore[arg-type]
