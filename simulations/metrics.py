"""A benchmark figure beside the baseline measured in the same run."""

from pathlib import Path

import attrs


@attrs.frozen
class Metric:
    """One measured figure, its same-run baseline, and whether it meets its target."""

    name: str
    value: float
    unit: str
    baseline: float
    ratio: float
    target: str
    met: bool


def metric(name: str, value: float, unit: str, baseline: float, target: str, met: bool) -> Metric:
    """Build a metric, computing its ratio to the baseline."""
    ratio = value / baseline if baseline else float("inf")
    return Metric(name, round(value, 4), unit, round(baseline, 4), round(ratio, 4), target, met)


def rss_mib(pid: int) -> float:
    """Return a running process's resident memory in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
