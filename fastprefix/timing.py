"""Timing for `fastprefix bench`: the spread of repeated runs of a call, the machine's load around them, repeats
chosen to fit a wall-time budget, and the warnings a reader needs when the spread or the load is too high for
the ratios between rows to mean anything.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

SPREAD_LIMIT = 0.10
"""A row whose interquartile range exceeds this fraction of its median is too noisy to compare with others."""
OTHERS_LIMIT = 0.2
"""Share of the machine's CPU time that other processes may use, before or while the bench runs, before its times
are disturbed: measured where the OS reports CPU time (Linux), from the 1-minute load average elsewhere."""
BUSY_BEFORE = 0.5
"""Where only the load average is known: 1-minute load average per CPU, at the start, above which other work
was already running (it decays over minutes, so it also counts work that just ended)."""
BUSY_DURING = 1.5
"""Where only the load average is known: its highest value per CPU while the bench ran above which other work
competed with it (the bench itself keeps at most one thread per CPU busy, i.e. a load of up to 1 per CPU)."""
PROBE_SECONDS = 0.5
"""How long the machine is watched, idle, before a run, to see what other processes use."""
MIN_REPEATS, MAX_REPEATS = 3, 11
"""Timed runs per variant when they are budgeted by time: at least 3 (a spread needs them), at most 11."""
BUDGET_SECONDS = 150
"""The bench's default wall time for the timed runs of all its variants together (setup and oracles come on
top): `fastprefix bench --model smollm2` then takes about 3 min 40 s on 2 quiet cores."""


@dataclass
class Timing:
    """The seconds of each timed run of one call."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def quartiles(self) -> tuple[float, float]:
        """(first, third) quartile; both the one time when there is one run."""
        if len(self.times) < 2:
            return self.times[0], self.times[0]
        q1, _, q3 = statistics.quantiles(self.times, n=4, method="inclusive")
        return q1, q3

    @property
    def spread(self) -> float | None:
        """Interquartile range over median; None for a single run, which has no spread."""
        if len(self.times) < 2:
            return None
        q1, q3 = self.quartiles
        return (q3 - q1) / self.median


def time_runs(fn, repeats: int, synchronize=lambda: None) -> Timing:
    """`repeats` timed runs of `fn()`, each between two `synchronize()` calls (a GPU's, to time its work too)."""
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return Timing(times)


def load_average() -> float | None:
    """The 1-minute load average; None where the OS has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (all CPUs, all processes, and time the hypervisor gave to
    other machines) since boot, from Linux's /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as stat:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in stat.readline().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass
class Load:
    """What else ran on the machine around a run: the share of all CPUs' time that other processes used
    (`others`: before the run, while the machine was watched idle; then over each interval between samples),
    and the 1-minute load average at each sample. `probe()` watches before the run, `sample()` after each part."""

    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    samples: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)
    _last: tuple | None = field(default=None, repr=False)

    def _mark(self) -> None:
        busy = busy_cpu_seconds()
        self._last = None if busy is None else (time.perf_counter(), busy, time.process_time())

    def _others_since_mark(self) -> None:
        last = self._last
        self._mark()
        if last is not None and self._last is not None:
            wall = self._last[0] - last[0]
            others = (self._last[1] - last[1]) - (self._last[2] - last[2])
            self.others.append(min(1.0, max(0.0, others / (wall * self.cpus))) if wall > 0 else 0.0)

    def probe(self, seconds: float = PROBE_SECONDS) -> None:
        """The load average now, and what other processes use of the CPUs over `seconds` while this one sleeps."""
        self._mark()
        time.sleep(seconds)
        self.sample()

    def sample(self) -> None:
        self._others_since_mark()
        value = load_average()
        if value is not None:
            self.samples.append(value)

    def describe(self) -> str:
        text = f"{self.cpus} CPUs"
        if self.others:
            text += f"; other processes used {self.others[0]:.0%} of them before the run"
            if len(self.others) > 1:
                text += f", up to {max(self.others[1:]):.0%} while it ran"
        if not self.samples:
            return text + ("" if self.others else ", load average unknown on this OS")
        text += f"; 1-minute load average {self.samples[0]:.1f}"
        if len(self.samples) > 1:
            text += f" before, up to {max(self.samples):.1f} while running, {self.samples[-1]:.1f} after"
        return text

    def as_dict(self) -> dict:
        return {"cpus": self.cpus, "load_1min_samples": [round(x, 2) for x in self.samples],
                "other_processes_cpu_share": [round(x, 3) for x in self.others]}


def load_warnings(load: Load) -> list[str]:
    """Why the other work on the machine makes the times untrustworthy; empty when it does not. Judged by the
    CPU share other processes used where it was measured, else by the load average."""
    found = []
    if load.others:
        if load.others[0] > OTHERS_LIMIT:
            found.append(f"the machine was already busy at the start (other processes used {load.others[0]:.0%} "
                         f"of its {load.cpus} CPUs, above {OTHERS_LIMIT:.0%})")
        if len(load.others) > 1 and max(load.others[1:]) > OTHERS_LIMIT:
            found.append(f"other work competed with the run (other processes used up to {max(load.others[1:]):.0%} "
                         f"of the {load.cpus} CPUs between samples, above {OTHERS_LIMIT:.0%})")
        return found
    if not load.samples:
        return []
    if load.samples[0] > BUSY_BEFORE * load.cpus:
        found.append(f"the machine was already busy at the start (load {load.samples[0]:.1f} on {load.cpus} "
                     f"CPUs, above {BUSY_BEFORE * load.cpus:.1f})")
    if max(load.samples) > BUSY_DURING * load.cpus:
        found.append(f"other work competed with the run (load up to {max(load.samples):.1f} on {load.cpus} CPUs, "
                     f"above the {load.cpus} the run accounts for itself + {(BUSY_DURING - 1) * load.cpus:.1f})")
    return found


def spread_warnings(spreads: dict[str, float | None]) -> list[str]:
    """Why the spreads of the rows (name -> interquartile range over median) make their ratios meaningless."""
    single = [name for name, spread in spreads.items() if spread is None]
    noisy = {name: spread for name, spread in spreads.items() if spread is not None and spread > SPREAD_LIMIT}
    found = []
    if single:
        found.append(f"{len(single)} rows have one timed run each, hence no spread: use --repeats 3 or more")
    if noisy:
        worst = max(noisy, key=noisy.get)
        found.append(f"{len(noisy)} of {len(spreads)} rows vary by more than {SPREAD_LIMIT:.0%} of their median "
                     f"between runs (worst: {worst}, {noisy[worst]:.0%})")
    return found


def trust_warning(spreads: dict[str, float | None], load: Load) -> str | None:
    """One paragraph saying that the ratios cannot be trusted, and why; None when nothing says so."""
    reasons = load_warnings(load) + spread_warnings(spreads)
    if not reasons:
        return None
    return ("WARNING: the times and ratios of this run cannot be trusted: " + "; ".join(reasons)
            + ". Rerun on a quiet machine (or with more --repeats) before comparing rows.")


def plan_repeats(one_run: dict, seconds: float) -> dict:
    """Timed runs per call (key -> one run's seconds) so that they, and one more run each (the profiled one for
    peak memory), fit `seconds` in all: the cheapest first, each taking an equal share of the time still left
    and as many runs as fit it, from MIN_REPEATS to MAX_REPEATS (so time that cheap calls leave unused goes to
    the costly ones, and a call too costly for its share still gets MIN_REPEATS)."""
    plan, left = {}, seconds
    for i, key in enumerate(sorted(one_run, key=one_run.get)):
        share = left / (len(one_run) - i)
        plan[key] = min(MAX_REPEATS, max(MIN_REPEATS, int(share / max(one_run[key], 1e-9)) - 1))
        left -= (plan[key] + 1) * one_run[key]
    return plan
