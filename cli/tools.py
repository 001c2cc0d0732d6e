"""Commands for developers: the deterministic simulation and the benchmarks."""

import json
import os
import random
from typing import Annotated

import typer
from rich.table import Table

from cli.common import app, console, out


def _parse_faults(faults: str) -> frozenset[str]:
    from simulations import FAULT_NAMES

    chosen = frozenset(f.strip() for f in faults.split(",") if f.strip())
    unknown = chosen - set(FAULT_NAMES)
    if unknown:
        raise typer.BadParameter(f"unknown {', '.join(sorted(unknown))}; choose from {', '.join(FAULT_NAMES)}")
    return chosen


@app.command()
def simulate(
    nodes: Annotated[int, typer.Option(metavar="N", min=2, max=64, help="Number of simulated devices.")] = 4,
    ops: Annotated[int, typer.Option(metavar="N", min=0, max=1_000_000, help="Local writes in total, over all devices.")] = 1000,
    seed: Annotated[int | None, typer.Option(metavar="N", help="RNG seed; default SIM_SEED or a random one.")] = None,
    faults: Annotated[
        str, typer.Option(metavar="LIST", help="Comma-separated: partition,drop,dup,reorder,delay,restart,oneway,hold.")
    ] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Run a deterministic multi-node sync simulation; the same seed replays the same run."""
    from simulations import SimConfig
    from simulations import simulate as run_simulation

    if seed is None:
        seed = int(os.environ["SIM_SEED"]) if "SIM_SEED" in os.environ else random.SystemRandom().randrange(1 << 32)
    config = SimConfig(nodes=nodes, ops=ops, seed=seed, faults=_parse_faults(faults))
    with console.status(f"simulating {nodes} nodes, {ops} ops, seed {seed} ..."):
        report = run_simulation(config)
    if as_json:
        print(json.dumps(report.to_json()))
    else:
        table = Table(title="simulation", show_header=False)
        for key, value in report.to_json().items():
            if key != "digests":
                table.add_row(key, str(value))
        table.add_row("distinct digests", str(len(set(report.digests))))
        out.print(table)
    if not report.converged:
        console.print(f"[red]did not converge[/red]; replay with SIM_SEED={seed} or --seed {seed}")
        raise typer.Exit(1)


@app.command()
def bench(
    name: Annotated[str, typer.Argument(metavar="crdt|stores|sync|relay|scale", help="Which benchmark.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Run a benchmark; every figure is printed beside a baseline measured in the same run."""
    from simulations.bench import BENCHES, run_bench

    if name not in BENCHES:
        raise typer.BadParameter(f"unknown benchmark {name!r}; choose from {', '.join(sorted(BENCHES))}")
    with console.status(f"running benchmark {name} ..."):
        report = run_bench(name)
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"bench {name}")
    for column in ("name", "value", "unit", "baseline", "ratio", "target", "met"):
        table.add_column(column)
    for row in report["metrics"]:
        table.add_row(*(str(row[c]) for c in ("name", "value", "unit", "baseline", "ratio", "target", "met")))
    out.print(table)
