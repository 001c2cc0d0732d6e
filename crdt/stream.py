"""A replica's merged state as a stream of bounded parts, which catch a peer up past compacted ops (docs/spec/sync.md,
section 4): a state never needs to be held, sent or merged whole."""

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from crdt.ops import Collection

if TYPE_CHECKING:
    from crdt.replica import Replica


@attrs.frozen
class StateResume:
    """Where a receiver stands in a state stream it did not finish: the stream's vector and the last message id merged."""

    vector: dict[str, int]
    after_id: str


@attrs.frozen
class StatePart:
    """One part of a state stream: some of the merged state, and where the part stands in its stream."""

    vector: dict[str, int]  # the stream's: all its parts together hold the effect of every op it covers
    number: int  # its place in the stream, from 0: a receiver counts the vector's ops only after every part in order
    upto: str  # the highest message id the stream has covered with this part ("" if none yet)
    final: bool  # the last part: the receiver may now count the vector's ops as applied
    messages_done: int  # messages sent in the stream, this part's included
    messages_total: int  # about how many the stream sends in all
    clock: int  # the sender's newest HLC: the receiver's next writes must stamp above what the state brought
    state: dict[str, Any]  # by collection: see StateStream


def state_keys(state: Mapping[str, Any]) -> dict[Collection, list[str]]:
    """Return the keys a (part of a) state snapshot holds merge state of, by collection."""
    keys: dict[Collection, list[str]] = {}
    for name, value in state.items():
        collection = Collection(name)
        if collection is Collection.MESSAGES:
            held = {*value["records"], *value["edits"], *value["tombstones"]}
        elif collection is Collection.MEMORIES:
            held = {*value["adds"], *value["removed"], *value["fields"]}
        elif collection is Collection.DEVICES:
            held = set(value["enrolments"])  # a device has a row once enrolled; a revocation alone writes none
        else:
            held = set(value)
        keys[collection] = sorted(held)
    return keys


MEMORIES_PER_MESSAGE = 4  # a part holds a quarter as many memories as messages: an embedding of 384 floats is 1.5 KB


class StateStream:
    """Reads a replica's merged state a part at a time: the first part holds every collection but messages and
    memories, the first parts the memories by id, and the next parts the messages by id; the vector is taken when the
    stream begins (or resumes).

    Memories are few beside messages and held in memory, so a stream that resumes sends them all again; ten thousand
    in one part would not fit a frame (16 MiB)."""

    def __init__(self, replica: "Replica", resume: StateResume | None = None) -> None:
        self._replica = replica
        durable = replica.log.durable()
        if resume is not None and not _resumable(replica, durable, resume.vector):
            resume = None
        # What the store holds the effect of, not what was applied: messages are read from the store as it is written.
        self.vector = durable if resume is None else dict(resume.vector)
        self.after_id = "" if resume is None else resume.after_id
        self.messages_done = 0
        self.messages_total = replica.messages.count_ids(self.after_id)
        self.ended = False
        self._parts_sent = 0
        self._memory_ids = replica.memories.ids()  # those still to send

    def peek(self, messages_max: int) -> StatePart:
        """Return the next part, with up to `messages_max` messages (or a quarter as many memories); the stream moves
        on only by `advance`."""
        replica, state = self._replica, {}
        if self._parts_sent == 0:
            state = {name: value for name, value in replica.state(messages=False).items() if name != "memories"}
        if self._memory_ids:
            memory_ids = self._memory_ids[: max(1, messages_max // MEMORIES_PER_MESSAGE)]
            state[Collection.MEMORIES.value] = replica.memories.to_state(memory_ids)
            final, upto, done = False, self.after_id, self.messages_done
        else:
            messages, upto = replica.messages.state_page(self.after_id, messages_max)
            count = len(state_keys({Collection.MESSAGES.value: messages})[Collection.MESSAGES])
            state[Collection.MESSAGES.value] = messages
            final, upto, done = count < messages_max, upto or self.after_id, self.messages_done + count
        total = max(done, self.messages_total)
        return StatePart(self.vector, self._parts_sent, upto, final, done, total, replica.clock.last, state)

    def advance(self, part: StatePart) -> None:
        """Move past a part `peek` returned, once it is sent."""
        self._parts_sent += 1
        if sent := set(state_keys(part.state).get(Collection.MEMORIES, ())):
            self._memory_ids = [memory_id for memory_id in self._memory_ids if memory_id not in sent]
        self.after_id = part.upto
        self.messages_done = part.messages_done
        self.ended = part.final


def _resumable(replica: "Replica", durable: Mapping[str, int], vector: Mapping[str, int]) -> bool:
    """Whether a stream begun at `vector` can go on here: this replica's store holds the effect of every op it covers,
    and still logs every op after it (the deltas that follow the stream)."""
    return all(seq <= durable.get(device, 0) for device, seq in vector.items()) and all(
        replica.log.base(device) <= vector.get(device, 0) for device in durable
    )
