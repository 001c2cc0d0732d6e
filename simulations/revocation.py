"""A simulation in which one node revokes another halfway through, and the revoked node keeps writing, backdated."""

from typing import Any

import attrs

from crdt import Collection, HybridClock, Kind, Op, Replica
from crdt.revocation import CUTOFF_FIELD
from simulations.world import SimConfig, SimReport, Simulation

FORGERIES = ("preference", "counter", "message", "message_delete", "memory_remove", "enrol", "revoke")
BACKDATE_MS_MAX = 5_000


@attrs.frozen
class RevocationReport:
    """A run's report, the revocation made in it, the ops the revoked device forged after it, and what each node
    would hold had those ops never been written (its oracle digest)."""

    sim: SimReport
    revocation: Op
    forged: tuple[Op, ...]
    digests_without_forged: tuple[str, ...]
    rebuilds: int  # how often nodes recomputed their state because a revocation voided ops already applied


class RevocationSimulation(Simulation):
    """The first node revokes the last once half the ops are written, fixing as the cut-off the revoked node's seq it
    has applied. From then on the revoked node ignores its revocation: each of its writes is forged with the next seq
    and a stamp before the revocation's, and once it has heard of the revocation it also revokes its revoker
    (claiming truthfully the revoker's seq it has applied)."""

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        names = list(self.nodes)
        self.revoker, self.revoked = names[0], names[-1]
        self.revocation: Op | None = None
        self.forged: list[Op] = []
        self._writes = 0

    def _write_one(self, name: str, replica: Replica) -> None:
        self._writes += 1
        if name == self.revoked and self.revocation is not None:
            self.forged.append(self._forge(replica))
        elif name == self.revoker and self.revocation is None and self._writes >= self.config.ops // 2:
            record = {"signer": name, "reason": "lost", CUTOFF_FIELD: replica.seq_of(self.revoked)}
            self.revocation = replica.revoke_device(self.revoked, record)
        else:
            super()._write_one(name, replica)

    def _forge(self, replica: Replica) -> Op:
        """Write, as the revoked node, one op past its cut-off, stamped before its revocation."""
        assert self.revocation is not None
        device, rng = self.revoked, self.rng
        seq = replica.seq_of(device) + 1
        hlc = self.revocation.hlc - (rng.randint(1, BACKDATE_MS_MAX) << 16)
        kind = rng.choice(FORGERIES)
        messages = sorted(replica.messages.records)
        memories = sorted(replica.memories.live_ids())
        knows = replica.devices.revoked_at(device) is not None
        target: tuple[Collection, str, Kind, Any]
        if kind == "message_delete" and messages:
            target = (Collection.MESSAGES, rng.choice(messages), Kind.DELETE, None)
        elif kind == "memory_remove" and memories:
            memory = rng.choice(memories)
            tags = [list(tag) for tag in replica.memories.live_tags(memory)]
            target = (Collection.MEMORIES, memory, Kind.REMOVE, tags)
        elif kind == "message":
            fields = {"conversation": "conv-0", "role": "user", "text": f"forged {seq}", "ts_ms": hlc >> 16}
            target = (Collection.MESSAGES, f"{device}-forged-{seq}", Kind.ADD, fields)
        elif kind == "counter":
            target = (Collection.COUNTERS, "counter-0", Kind.ADD, [1_000_000 + seq, 0])
        elif kind == "enrol":
            target = (Collection.DEVICES, "ghost", Kind.ENROL, {"name": "ghost", "signer": device})
        elif kind == "revoke" and knows:
            record = {"signer": device, "reason": "forged", CUTOFF_FIELD: replica.seq_of(self.revoker)}
            target = (Collection.DEVICES, self.revoker, Kind.REVOKE, record)
        else:
            target = (Collection.PREFERENCES, f"pref-{rng.randrange(40)}", Kind.SET, f"forged {seq}")
        op = Op(device, seq, hlc, *target)
        result = replica.apply([op])
        assert result.applied == (op,), f"the revoked node's own replica refused its forged op: {result.refused}"
        return op

    def run_revocation(self) -> RevocationReport:
        """Run, then compute for every node what it would hold without the forged ops."""
        report = self.run()
        assert self.revocation is not None, "the run ended before the revocation was made"
        forged = {op.id for op in self.forged}
        oracles = []
        for node in self.nodes.values():
            logged = node.replica.ops_since({}, 1 << 30)
            oracle = Replica(f"oracle-{node.name}", HybridClock(node.now_ms))
            oracle.apply([op for op in logged if op.id not in forged])
            assert oracle.held_count == 0
            oracles.append(oracle.digest().sha256)
        rebuilds = sum(node.replica.rebuilds for node in self.nodes.values())
        return RevocationReport(report, self.revocation, tuple(self.forged), tuple(oracles), rebuilds)
