"""Random local writes across every collection, drawn from the simulation's seeded RNG."""

import random

import numpy as np

from crdt import Collection, Op, Replica

EMBEDDING_DIMS = 8
PREFERENCE_KEYS = 40
CONVERSATIONS = 5
NOTES = 3
COUNTERS = 6
WORDS = ("tea", "walk", "music", "rain", "book", "friend", "city", "code", "dream", "garden")

# (weight, writer name): the share of each kind of write in the workload.
MIX = (
    (28, "preference"),
    (4, "setting"),
    (24, "message"),
    (5, "message_edit"),
    (3, "message_delete"),
    (10, "memory"),
    (3, "memory_edit"),
    (2, "memory_remove"),
    (5, "note"),
    (16, "counter"),
)
_WEIGHTS = [weight for weight, _ in MIX]
_NAMES = [name for _, name in MIX]


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _pick(rng: random.Random, keys: list[str]) -> str | None:
    return rng.choice(keys) if keys else None


class Workload:
    """Makes one random write at a time on a replica, and counts them."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.written = 0

    def write(self, replica: Replica) -> Op:
        """Make one random local write on `replica` and return its op."""
        name = self.rng.choices(_NAMES, _WEIGHTS)[0]
        op = getattr(self, f"_{name}")(replica)
        self.written += 1
        return op

    def _preference(self, replica: Replica) -> Op:
        key = f"pref-{self.rng.randrange(PREFERENCE_KEYS)}"
        value = self.rng.choice([self.rng.randrange(1000), _sentence(self.rng, 2), self.rng.random() < 0.5])
        return replica.set_preference(key, value)

    def _setting(self, replica: Replica) -> Op:
        return replica.set_preference(f"setting-{self.rng.randrange(5)}", self.rng.randrange(10), collection=Collection.SETTINGS)

    def _message(self, replica: Replica) -> Op:
        message_id = f"{replica.device_id}-m{replica.seq_of(replica.device_id) + 1}"
        fields = {
            "conversation": f"conv-{self.rng.randrange(CONVERSATIONS)}",
            "role": self.rng.choice(["user", "assistant"]),
            "text": _sentence(self.rng, self.rng.randint(3, 12)),
            "ts_ms": replica.clock.last >> 16,
            "sentiment": round(self.rng.uniform(-1, 1), 3),
            "response_time_ms": self.rng.randint(50, 3000),
        }
        return replica.add_message(message_id, fields)

    def _message_edit(self, replica: Replica) -> Op:
        message_id = _pick(self.rng, list(replica.messages.records))
        if message_id is None:
            return self._message(replica)
        return replica.edit_message(message_id, "text", _sentence(self.rng, 4))

    def _message_delete(self, replica: Replica) -> Op:
        message_id = _pick(self.rng, list(replica.messages.records))
        if message_id is None:
            return self._message(replica)
        return replica.delete_message(message_id)

    def _memory(self, replica: Replica) -> Op:
        live = replica.memories.live_ids()
        source = _pick(self.rng, live) if self.rng.random() < 0.3 else None
        vector = np.array([self.rng.gauss(0, 1) for _ in range(EMBEDDING_DIMS)], dtype="<f4")
        if source is not None and replica.memories.fields[source]["embedding"].value:
            # A near-duplicate of a memory this device already has, to exercise dedup.
            base = np.frombuffer(replica.memories.fields[source]["embedding"].value, dtype="<f4")
            vector = (base + vector * 0.01).astype("<f4")
        memory_id = f"{replica.device_id}-k{replica.seq_of(replica.device_id) + 1}"
        return replica.add_memory(memory_id, _sentence(self.rng, 5), vector.tobytes(), {"source": "sim"})

    def _memory_edit(self, replica: Replica) -> Op:
        memory_id = _pick(self.rng, replica.memories.live_ids())
        if memory_id is None:
            return self._memory(replica)
        return replica.edit_memory(memory_id, "text", _sentence(self.rng, 5))

    def _memory_remove(self, replica: Replica) -> Op:
        memory_id = _pick(self.rng, replica.memories.live_ids())
        if memory_id is None:
            return self._memory(replica)
        return replica.remove_memory(memory_id)

    def _note(self, replica: Replica) -> Op:
        name = f"note-{self.rng.randrange(NOTES)}"
        text = replica.notes.text(name) or ""
        position = self.rng.randint(0, len(text))
        if text and self.rng.random() < 0.3:
            text = text[:position] + text[position + self.rng.randint(1, 5) :]
        else:
            text = text[:position] + self.rng.choice(WORDS) + " " + text[position:]
        return replica.edit_note(name, text[-400:])

    def _counter(self, replica: Replica) -> Op:
        return replica.increment(f"counter-{self.rng.randrange(COUNTERS)}", self.rng.randint(-3, 5))
