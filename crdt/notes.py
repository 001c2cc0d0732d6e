"""Relationship notes and profile text: one Loro document per note, so concurrent edits both survive."""

import hashlib

from loro import ExportMode, LoroDoc

from crdt.errors import InvalidOpError
from crdt.journal import ConflictJournal
from crdt.ops import Op

TEXT_CONTAINER = "text"


def loro_peer_id(device_id: str) -> int:
    """Return the Loro peer id a device edits under, the same on every device."""
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big") >> 1


def import_update(doc: LoroDoc, update: bytes) -> bool:
    """Import Loro bytes into a document; return whether parts wait on missing updates."""
    try:
        status = doc.import_(update)
    except BaseException as error:  # Loro raises bare BaseException on bad input
        if type(error) is not BaseException:
            raise
        raise InvalidOpError(f"note update is not valid Loro data: {error}") from None
    return bool(status.pending)


class NoteSet:
    """Notes keyed by name; each op carries the Loro update that one edit produced."""

    def __init__(self, device_id: str) -> None:
        self.peer_id = loro_peer_id(device_id)
        self.docs: dict[str, LoroDoc] = {}
        # Updates Loro holds back until their causal predecessors arrive; Loro's own snapshot
        # leaves them out, so they are kept here to survive a save and reload.
        self.waiting: dict[str, list[bytes]] = {}

    def _doc(self, name: str) -> LoroDoc:
        doc = self.docs.get(name)
        if doc is None:
            doc = self.docs[name] = LoroDoc()
            doc.peer_id = self.peer_id
        return doc

    def apply(self, op: Op, journal: ConflictJournal) -> bool:
        self._import(op.key, op.payload)
        return True

    def _import(self, name: str, update: bytes) -> None:
        doc = self._doc(name)
        if import_update(doc, update):
            self.waiting.setdefault(name, []).append(update)
        elif name in self.waiting:
            # Something arrived; keep only the updates that still wait on a missing predecessor.
            self.waiting[name] = [u for u in self.waiting[name] if import_update(doc, u)]

    def edit(self, name: str, text: str) -> bytes:
        """Change a note's text to `text` locally and return the Loro update for the op."""
        doc = self._doc(name)
        before = doc.oplog_vv
        doc.get_text(TEXT_CONTAINER).update(text)
        doc.commit()
        return doc.export(ExportMode.Updates(before))

    def text(self, name: str) -> str | None:
        doc = self.docs.get(name)
        return None if doc is None else doc.get_text(TEXT_CONTAINER).to_string()

    def to_state(self) -> dict:
        return {
            name: [doc.export(ExportMode.Snapshot()), self.waiting.get(name, [])] for name, doc in self.docs.items()
        }

    def join_state(self, state: dict, journal: ConflictJournal) -> None:
        for name, (snapshot, waiting) in state.items():
            self._import(name, snapshot)
            for update in waiting:
                self._import(name, update)

    def view(self) -> dict:
        return {name: self.text(name) for name in self.docs}

    def __len__(self) -> int:
        return len(self.docs)
