"""What `fastprefix bench` writes: the table (with each row's spread), the warning when its numbers cannot be
trusted, the JSON file and the figure of the attention sweep."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import subprocess
from dataclasses import asdict

import torch

from .bench import AttentionShape, Row, Settings
from .timing import Load, trust_warning

LEGEND = """median: of the timed runs ("runs"); IQR: interquartile range of their times over the median; min-max: the
fastest and the slowest run. A row's time is reproducible to about its IQR; rows whose IQRs are large (over 10 %)
or a busy machine make the ratios below meaningless, and the run then says so.
vs base: time over the workload's baseline: PEFT ("peft"; in the attention sweep, the prefix copied per row and
concatenated), or for the shared prompt, the prompt's cache copied to every row; "~": the difference from the
baseline is within the two rows' IQRs together, i.e. not told apart from noise."""


def within_noise(row: Row, base: Row) -> bool:
    """Whether `row`'s ratio to `base` is within the two rows' spreads (interquartile range over median)."""
    if row is base or row.timing.spread is None or base.timing.spread is None:
        return False
    return abs(row.ratio_to_baseline - 1) <= row.timing.spread + base.timing.spread


def _baseline_of(row: Row, rows: list[Row]) -> Row:
    return next(r for r in rows if r.workload == row.workload and r.variant == row.baseline)


def format_table(rows: list[Row], notes: list[str] = ()) -> str:
    width = max(len("workload"), *(len(r.workload) for r in rows)) + 2
    header = (f"{'workload':<{width}}{'variant':<14}{'median ms':>10}{'IQR':>6}{'min-max ms':>18}{'runs':>6}"
              f"{'tokens/s':>10}{'peak MiB':>10}{'vs base':>9}  matched")
    lines = [header, "-" * len(header)]
    for r in rows:
        matched = "-" if r.matched is None else ("yes" if r.matched else "NO")
        spread = "-" if r.timing.spread is None else f"{r.timing.spread:.0%}"
        extremes = f"{min(r.times) * 1e3:.1f}-{max(r.times) * 1e3:.1f}"
        noise = "~" if within_noise(r, _baseline_of(r, rows)) else " "
        lines.append(f"{r.workload:<{width}}{r.variant:<14}{r.seconds * 1e3:>10.1f}{spread:>6}{extremes:>18}"
                     f"{len(r.times):>6}{r.tokens_per_second:>10.0f}{r.peak_bytes / 2**20:>10.1f}"
                     f"{r.ratio_to_baseline:>7.2f}x{noise}  {matched}")
    return "\n".join(lines + [LEGEND] + [f"note: {note}" for note in notes])


def run_warning(rows: list[Row], load: Load) -> str | None:
    """The warning that the run's times and ratios cannot be trusted (spread or load), or None."""
    return trust_warning({f"{r.workload}: {r.variant}": r.timing.spread for r in rows}, load)


def environment(s: Settings) -> dict:
    versions = {}
    for package in ("fastprefix", "torch", "triton", "transformers", "peft"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=__file__.rsplit("/", 2)[0], check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    device = torch.device(s.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": name, "commit": commit,
            "versions": versions}


def _row_json(r: Row) -> dict:
    q1, q3 = r.timing.quartiles
    return asdict(r) | {"seconds": r.seconds, "seconds_min": min(r.times), "seconds_q1": q1, "seconds_q3": q3,
                        "seconds_max": max(r.times), "spread": r.timing.spread,
                        "tokens_per_second": r.tokens_per_second}


def write_json(path: str, rows: list[Row], s: Settings, load: Load, notes: list[str] = ()) -> None:
    """The environment, settings, machine load, trust verdict, notes and every row (with each timed run's
    seconds; "spread" is the interquartile range over the median)."""
    warning = run_warning(rows, load)
    with open(path, "w") as f:
        json.dump({"environment": environment(s), "settings": asdict(s), "load": load.as_dict(),
                   "trust": {"trusted": warning is None, "warning": warning}, "notes": list(notes),
                   "rows": [_row_json(r) for r in rows]}, f, indent=2)


def _sweep_point(r: Row) -> tuple[int, int]:
    """(batch, prefix length) of an attention-sweep row, from its workload name "... B=<b> P=<p>"."""
    batch, prefix = (int(part.split("=")[1]) for part in r.workload.split()[-2:])
    return batch, prefix


def plot(path: str, rows: list[Row], s: Settings, shape: AttentionShape) -> None:
    """Time and peak memory of the attention sweep vs prefix length and vs batch size, fastprefix vs PEFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in rows if r.workload.startswith("attention")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (label, fixed, varying) in enumerate((("prefix length P", lambda b, p: b == s.batch, 1),
                                                  ("batch size B", lambda b, p: p == s.prefix_len, 0))):
        for variant, style in (("fastprefix", "o-"), ("peft", "s--")):
            pts = sorted((_sweep_point(r)[varying], r) for r in sweep
                         if r.variant == variant and fixed(*_sweep_point(r)))
            xs = [x for x, _ in pts]
            axes[0][col].plot(xs, [r.seconds * 1e3 for _, r in pts], style, label=variant)
            axes[1][col].plot(xs, [r.peak_bytes / 2**20 for _, r in pts], style, label=variant)
        for row, ylabel in ((0, "time (ms, median)"), (1, "peak memory (MiB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"attention forward+backward, causal, N=S={s.seq_len}, {shape}, {s.dtype}, {s.device} "
                 f"(left: B={s.batch}; right: P={s.prefix_len})\n"
                 "peft = the prefix copied per row, concatenated, K/V heads repeated, then SDPA")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
