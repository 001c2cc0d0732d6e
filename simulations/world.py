"""Many nodes syncing over a SimNetwork in rounds, with random faults, restarts and a final heal."""

import itertools
import os
import random
import time
from collections.abc import Sequence

import attrs

from crdt import HybridClock, MemoryLog, Replica, load_replica, save_replica
from framing import RemoteProtocolError
from node.sync.session import SessionConfig, SessionState, SyncSession
from simulations.network import Faults, SimNetwork
from simulations.workload import Workload

FAULT_NAMES = ("partition", "drop", "dup", "reorder", "delay", "restart", "oneway", "hold", "compact")
ROUND_MS = 10
SESSION_CONFIG = SessionConfig(part_messages_max=8)  # a state stream of a few hundred messages comes in many parts


@attrs.frozen
class SimConfig:
    """One simulation run: size, seed, faults and the bounds that end it."""

    nodes: int = 4
    ops: int = 400
    seed: int = 0
    faults: frozenset[str] = frozenset()
    ops_per_node_round: int = 4
    refresh_every_rounds: int = 4
    heal_rounds_max: int = 200
    clock_skew_ms_max: int = 500

    def __attrs_post_init__(self) -> None:
        unknown = self.faults - set(FAULT_NAMES)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULT_NAMES)}")
        if self.nodes < 2 or self.ops < 0:
            raise ValueError("a simulation needs at least 2 nodes and a non-negative op count")


@attrs.frozen
class SimReport:
    """What a run showed: whether all nodes converged and what it cost."""

    converged: bool
    seed: int
    nodes: int
    ops: int
    rounds: int
    rounds_after_heal: int | None
    wire_bytes: int
    wire_bytes_per_op: float
    messages: int
    dropped: int
    duplicated: int
    restarts: int
    compactions: int
    protocol_errors: int
    wall_s: float
    digests: list[str]

    def to_json(self) -> dict:
        return attrs.asdict(self)


class SimNode:
    """A replica and its sessions, one per peer; a session is replaced when its link reconnects."""

    def __init__(self, name: str, clock_skew_ms: int, network: SimNetwork) -> None:
        self.name = name
        self.skew_ms = clock_skew_ms
        self.network = network
        self.replica = Replica(name, HybridClock(self.now_ms))
        self.sessions: dict[str, SyncSession] = {}

    def now_ms(self) -> int:
        return 1_700_000_000_000 + self.network.round * ROUND_MS + self.skew_ms

    def restart(self) -> None:
        """Stop and start again from the persisted state (every applied op was durable)."""
        self.replica = load_replica(save_replica(self.replica), self.now_ms)


class Simulation:
    """Drives a SimConfig to its report; the same seed replays the same run."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        faults = config.faults
        self.network = SimNetwork(
            self.rng,
            Faults(
                drop=0.02 if "drop" in faults else 0.0,
                duplicate=0.05 if "dup" in faults else 0.0,
                reorder=0.1 if "reorder" in faults else 0.0,
                delay_rounds_max=2 if "delay" in faults else 0,
            ),
        )
        self.nodes = {
            name: SimNode(name, self.rng.randint(0, config.clock_skew_ms_max), self.network)
            for name in (f"n{i:02d}" for i in range(config.nodes))
        }
        for name in self.nodes:
            self.network.add_host(name)
        self.links = list(itertools.combinations(self.nodes, 2))
        self._generation = {link: 0 for link in self.links}
        for link in self.links:
            self._connect(link)
        self.workload = Workload(self.rng)
        self.restarts = 0
        self.compactions = 0
        self.protocol_errors = 0

    # -- links -------------------------------------------------------------------------------------

    def _connect(self, link: tuple[str, str]) -> None:
        """(Re)open a link: fresh sessions on both ends, which start with HELLO."""
        self._generation[link] += 1
        a, b = link
        self.nodes[a].sessions[b] = SyncSession(self.nodes[a].replica, SESSION_CONFIG)
        self.nodes[b].sessions[a] = SyncSession(self.nodes[b].replica, SESSION_CONFIG)

    def _link(self, a: str, b: str) -> tuple[str, str]:
        return (a, b) if a < b else (b, a)

    def _reconnect_cut_links(self) -> None:
        for link in self.links:
            a, b = link
            sessions_over = SessionState.CLOSED in (self.nodes[a].sessions[b].state, self.nodes[b].sessions[a].state)
            if sessions_over or self._cut_since_connect.get(link):
                if not (self.network.is_cut(a, b) or self.network.is_cut(b, a)):
                    self._cut_since_connect[link] = False
                    self._connect(link)

    # -- a round -----------------------------------------------------------------------------------

    def _send_all(self) -> None:
        for name, node in self.nodes.items():
            for peer, session in node.sessions.items():
                generation = self._generation[self._link(name, peer)]
                while (data := session.generate()) is not None:
                    self.network.send(name, peer, (generation, data), len(data))

    def _deliver_all(self) -> None:
        for envelope in self.network.deliver():
            generation, data = envelope.payload
            link = self._link(envelope.src, envelope.dst)
            session = self.nodes[envelope.dst].sessions[envelope.src]
            if generation != self._generation[link] or session.state is SessionState.CLOSED:
                continue  # sent on a connection that no longer exists
            try:
                session.receive_data(data)
            except RemoteProtocolError:
                self.protocol_errors += 1

    def _refresh_all(self) -> None:
        for node in self.nodes.values():
            for session in node.sessions.values():
                session.refresh()

    def _write_some(self, remaining: int) -> int:
        written = 0
        for name, node in self.nodes.items():
            for _ in range(self.rng.randint(0, 2 * self.config.ops_per_node_round)):
                if written == remaining:
                    return written
                self._write_one(name, node.replica)
                written += 1
        return written

    def _write_one(self, name: str, replica: Replica) -> None:
        """Make one local write on a node."""
        self.workload.write(replica)

    def _random_fault(self) -> None:
        faults, names, rng = self.config.faults, list(self.nodes), self.rng
        roll = rng.random()
        if "partition" in faults and roll < 0.05:
            rng.shuffle(names)
            cut = rng.randint(1, len(names) - 1)
            self.network.partition(names[:cut], names[cut:])
            self._mark_cut()
        elif "oneway" in faults and roll < 0.08:
            src, dst = rng.sample(names, 2)
            self.network.partition_oneway(src, dst)
            self._mark_cut()
        elif roll < 0.15 and any(f in faults for f in ("partition", "oneway")):
            self.network.repair()
        elif "hold" in faults and roll < 0.18:
            src, dst = rng.sample(names, 2)
            self.network.hold(src, dst)
            self._held.append((src, dst))
        elif self._held and roll < 0.25:
            self.network.release(*self._held.pop(0))
        elif "restart" in faults and roll < 0.27:
            self._restart(rng.choice(names))
        elif "compact" in faults and roll < 0.29:
            # As if every device had acknowledged its ops (an ack may be lost, or a device restored from a backup):
            # peers that lack them catch up from its state, streamed in parts over the faulty network.
            replica = self.nodes[rng.choice(names)].replica
            assert isinstance(replica.log, MemoryLog)
            self.compactions += 1
            replica.log.compact(replica.vector)

    def _mark_cut(self) -> None:
        for a, b in self.links:
            if self.network.is_cut(a, b) or self.network.is_cut(b, a):
                self._cut_since_connect[(a, b)] = True

    def _restart(self, name: str) -> None:
        node = self.nodes[name]
        node.restart()
        self.restarts += 1
        for peer in self.nodes:
            if peer != name:
                self._connect(self._link(name, peer))

    def _heal(self) -> None:
        self.network.repair()
        for src, dst in self._held:
            self.network.release(src, dst)
        self._held.clear()
        self.network.set_faults(Faults())

    def _converged(self) -> bool:
        vectors = [node.replica.vector for node in self.nodes.values()]
        if any(v != vectors[0] for v in vectors) or any(n.replica.held_count for n in self.nodes.values()):
            return False
        digests = {node.replica.digest().sha256 for node in self.nodes.values()}
        return len(digests) == 1

    def run(self) -> SimReport:
        """Write the ops under faults, heal, then count rounds until every digest is equal."""
        started = time.perf_counter()
        self._cut_since_connect: dict[tuple[str, str], bool] = {}
        self._held: list[tuple[str, str]] = []
        remaining = self.config.ops
        while remaining:
            if self.config.faults:
                self._random_fault()
            remaining -= self._write_some(remaining)
            self._step()
        self._heal()
        self._reconnect_cut_links()
        self._refresh_all()
        heal_round = self.network.round
        converged = False
        for _ in range(self.config.heal_rounds_max):
            self._step()
            if self._converged():
                converged = True
                break
        stats = self.network.stats
        deliveries = max(self.config.ops * (self.config.nodes - 1), 1)
        return SimReport(
            converged=converged,
            seed=self.config.seed,
            nodes=self.config.nodes,
            ops=self.config.ops,
            rounds=self.network.round,
            rounds_after_heal=self.network.round - heal_round if converged else None,
            wire_bytes=stats.bytes,
            wire_bytes_per_op=round(stats.bytes / deliveries, 2),
            messages=stats.messages,
            dropped=stats.dropped,
            duplicated=stats.duplicated,
            restarts=self.restarts,
            compactions=self.compactions,
            protocol_errors=self.protocol_errors,
            wall_s=round(time.perf_counter() - started, 3),
            digests=[node.replica.digest().sha256 for node in self.nodes.values()],
        )

    def _step(self) -> None:
        if self.network.round % self.config.refresh_every_rounds == 0:
            self._reconnect_cut_links()
            self._refresh_all()
        self._send_all()
        self._deliver_all()


def simulate(config: SimConfig) -> SimReport:
    """Run one simulation and return its report."""
    return Simulation(config).run()


def seed_from_env(default: int) -> int:
    """Return SIM_SEED from the environment if set, so a failing run can be replayed."""
    return int(os.environ.get("SIM_SEED", default))


def sweep(configs: Sequence[SimConfig]) -> list[SimReport]:
    """Run several simulations and return their reports in order."""
    return [simulate(config) for config in configs]
