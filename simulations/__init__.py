"""Deterministic multi-node simulations and benchmarks of the sync protocol."""

from simulations.network import Envelope, Faults, SimNetwork
from simulations.world import FAULT_NAMES, SimConfig, SimReport, Simulation, seed_from_env, simulate

__all__ = ["FAULT_NAMES", "Envelope", "Faults", "SimConfig", "SimNetwork", "SimReport", "Simulation", "seed_from_env", "simulate"]
