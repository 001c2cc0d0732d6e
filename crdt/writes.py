"""A replica's local writes: one method per kind of change a user makes, each returning its op."""

from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from crdt.counters import CounterSet
from crdt.errors import InvalidOpError, ValueTooLargeError
from crdt.hlc import HybridClock
from crdt.lww import LwwMap
from crdt.memories import MemorySet
from crdt.messages import MessageSet
from crdt.notes import NoteSet
from crdt.ops import Collection, Kind, Op
from crdt.registry import DeviceRegistry
from crdt.schema import payload_is_valid


class LocalWrites:
    """The write half of a replica; `Replica` supplies the state and commits the ops."""

    device_id: str
    clock: HybridClock
    config: Any
    messages: MessageSet
    memories: MemorySet
    notes: NoteSet
    counters: CounterSet
    devices: DeviceRegistry
    _rules: dict[Collection, Any]
    _commit: Callable[[Op], None]
    seq_of: Callable[[str], int]

    def set_preference(self, key: str, value: Any, *, collection: Collection = Collection.PREFERENCES) -> Op:
        """Write a preference (or setting) and return its op."""
        rule = self._rules[collection]
        if not isinstance(rule, LwwMap):
            raise InvalidOpError(f"{collection} is not a last-writer-wins map")
        current = rule.registers.get(key)
        return self._write(collection, key, Kind.SET, value, None if current is None else current.op_id)

    def add_message(self, message_id: str, fields: Mapping[str, Any]) -> Op:
        """Add an immutable message (conversation, role, text, ts_ms, ...) and return its op."""
        return self._write(Collection.MESSAGES, message_id, Kind.ADD, dict(fields))

    def edit_message(self, message_id: str, field: str, value: Any) -> Op:
        """Change one field of a message (last writer wins) and return the op."""
        current = self.messages.edit_of(message_id, field)
        return self._write(Collection.MESSAGES, message_id, Kind.EDIT, [field, value], current and current.op_id)

    def delete_message(self, message_id: str) -> Op:
        """Tombstone a message everywhere and return the op."""
        return self._write(Collection.MESSAGES, message_id, Kind.DELETE, None)

    def add_memory(self, memory_id: str, text: str, embedding: bytes | None, metadata: Mapping[str, Any]) -> Op:
        """Add a memory (text, float32 embedding bytes, metadata) and return its op."""
        payload = {"text": text, "embedding": embedding, "metadata": dict(metadata)}
        return self._write(Collection.MEMORIES, memory_id, Kind.ADD, payload)

    def edit_memory(self, memory_id: str, field: str, value: Any) -> Op:
        """Change one field of a memory (last writer wins) and return the op."""
        current = self.memories.fields.get(memory_id, {}).get(field)
        return self._write(Collection.MEMORIES, memory_id, Kind.EDIT, [field, value], current and current.op_id)

    def remove_memory(self, memory_id: str) -> Op:
        """Remove the adds of a memory seen so far (a concurrent add still wins) and return the op."""
        observed = [list(tag) for tag in self.memories.live_tags(memory_id)]
        return self._write(Collection.MEMORIES, memory_id, Kind.REMOVE, observed)

    def edit_note(self, name: str, text: str) -> Op:
        """Set a note's text, merged character-wise with concurrent edits, and return the op."""
        self._check_size(text)  # before the edit: the Loro document changes as the update is made
        return self._write(Collection.NOTES, name, Kind.UPDATE, self.notes.edit(name, text))

    def increment(self, name: str, delta: int = 1) -> Op:
        """Add `delta` (may be negative) to a counter and return the op."""
        return self._write(Collection.COUNTERS, name, Kind.ADD, list(self.counters.next_totals(name, self.device_id, delta)))

    def enrol_device(self, device: str, record: Mapping[str, Any]) -> Op:
        """Enrol a device (public key, name, signer, signature) and return the op."""
        current = self.devices.enrolments.get(device)
        return self._write(Collection.DEVICES, device, Kind.ENROL, dict(record), current and current.op_id)

    def revoke_device(self, device: str, record: Mapping[str, Any]) -> Op:
        """Revoke a device for good (signer, signature) and return the op."""
        return self._write(Collection.DEVICES, device, Kind.REVOKE, dict(record))

    def _check_size(self, value: Any) -> None:
        size = len(msgpack.packb(value, use_bin_type=True))
        if size > self.config.value_bytes_max:
            raise ValueTooLargeError(f"value of {size} bytes exceeds the {self.config.value_bytes_max}-byte limit")

    def _write(self, collection: Collection, key: str, kind: Kind, payload: Any, prev: Any = None) -> Op:
        if self.devices.revoked_at(self.device_id) is not None:
            # Its writes would count nowhere; refusing them also keeps its note edits from reusing Loro op ids.
            raise InvalidOpError(f"this device ({self.device_id}) was revoked: it can no longer write")
        if not payload_is_valid(collection, kind, payload):
            raise InvalidOpError(f"malformed {collection} {kind} value: {payload!r:.200}")
        self._check_size(payload)
        op = Op(self.device_id, self.seq_of(self.device_id) + 1, self.clock.now(), collection, key, kind, payload, prev)
        self._commit(op)
        return op
