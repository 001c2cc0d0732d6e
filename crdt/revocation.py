"""Which revocations count, and which ops of revoked devices have no effect (docs/spec/sync.md, section 2)."""

from collections.abc import Iterable, Mapping

import attrs

from crdt.ops import Op, OpId

CUTOFF_FIELD = "cutoff_seq"
"""The revocation record's field naming the revoked device's last seq that still counts."""


@attrs.frozen
class Settlement:
    """The settled revocations: per revoked device, the seq or stamp after which its ops have no effect."""

    cutoff_seq: Mapping[str, int] = attrs.field(factory=dict)
    cutoff_hlc: Mapping[str, int] = attrs.field(factory=dict)  # from records without a cut-off (older nodes)
    exempt: frozenset[OpId] = frozenset()  # revocations past their own device's cut-off that count (a cycle)

    def voids(self, op: Op) -> bool:
        """Return whether an op has no effect: its device was revoked before it, by seq or, failing that, stamp."""
        if not (self.cutoff_seq or self.cutoff_hlc):
            return False
        seq_max = self.cutoff_seq.get(op.device)
        hlc_max = self.cutoff_hlc.get(op.device)
        past = (seq_max is not None and op.seq > seq_max) or (hlc_max is not None and op.hlc > hlc_max)
        return past and op.id not in self.exempt


def _cuts_off(revocation: Op, op: Op) -> bool:
    """Whether a revocation voids an op: one of the device it revokes, past its cut-off (or its stamp)."""
    if op.device != revocation.key:
        return False
    cutoff = revocation.payload.get(CUTOFF_FIELD)
    return op.seq > cutoff if cutoff is not None else op.hlc > revocation.hlc


def settle(revocations: Iterable[Op]) -> Settlement:
    """Settle which revocation ops count and return the cut-offs they fix.

    A revocation op is itself an op of its device, so another revocation may void it. Those that no counting
    revocation voids count, those that one voids do not, decided until nothing changes (grounded: the same for any
    order of arrival). Revocations left undecided void each other in a cycle (two devices revoking each other, neither
    having seen the other's): both count, so each device loses what the other cut off, and neither can write again.
    """
    ops = {op.id: op for op in revocations}
    by_target: dict[str, list[Op]] = {}
    for op in ops.values():
        by_target.setdefault(op.key, []).append(op)
    attackers = {
        op_id: [r.id for r in by_target.get(op.device, ()) if _cuts_off(r, op)] for op_id, op in ops.items()
    }
    counts: dict[OpId, bool] = {}
    for _ in range(len(ops) + 1):  # each pass decides at least one op, or nothing is left to decide
        decided = len(counts)
        for op_id, against in attackers.items():
            if op_id in counts:
                continue
            if any(counts.get(r) is True for r in against):
                counts[op_id] = False
            elif all(counts.get(r) is False for r in against):
                counts[op_id] = True
        if len(counts) == decided:
            break
    cutoff_seq: dict[str, int] = {}
    cutoff_hlc: dict[str, int] = {}
    for op_id, op in ops.items():
        if counts.get(op_id) is False:
            continue
        cutoff = op.payload.get(CUTOFF_FIELD)
        if cutoff is None:
            cutoff_hlc[op.key] = min(cutoff_hlc.get(op.key, op.hlc), op.hlc)
        else:
            cutoff_seq[op.key] = min(cutoff_seq.get(op.key, cutoff), cutoff)
    return Settlement(cutoff_seq, cutoff_hlc, frozenset(op_id for op_id in ops if op_id not in counts))
