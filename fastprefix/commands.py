"""What each `fastprefix` command does, once `cli` has parsed its arguments: first the checks that need torch
(the device exists here, the model's type is supported), then the command. The heavy imports (transformers,
PEFT, the kernels) happen inside the commands, after those checks."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import time

import torch

from .presets import DEMO_DURATION, PRESET_LABELS, model_types

CHECK_DTYPES = ("float32", "float16", "bfloat16")


class UsageError(ValueError):
    """An argument that parsed but cannot be used on this machine: a device it lacks, or a model whose type
    fastprefix does not support. The command line prints it as one line and exits with status 2."""


def available_devices() -> list[str]:
    """The devices torch can use on this machine: cpu, then each CUDA GPU, Apple's mps, each Intel XPU."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += [f"xpu:{i}" for i in range(xpu.device_count())]
    return found


def _why_missing(device: torch.device) -> str:
    if device.type == "cuda" and torch.version.cuda is None:
        return f"this torch, {torch.__version__}, was built without CUDA"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return f"{count} CUDA GPU{'s' if count != 1 else ''} visible"
    if device.type == "mps":
        return "torch has no MPS backend here; MPS is Apple silicon's"
    return f"torch sees no {device.type} device"


def require_device(text: str | None) -> torch.device:
    """The device `--device text` names (None: cuda if this machine has one, else cpu); UsageError, saying
    what this machine has, when it lacks that device."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    available = available_devices()
    indexed = str(device) if device.index is not None or device.type in ("cpu", "mps") else f"{device.type}:0"
    if indexed not in available:
        raise UsageError(f"argument --device: {text} is not available here: {_why_missing(device)}; devices here: "
                         f"{', '.join(available)}, and `fastprefix info` shows what runs on each")
    return device


def require_supported_model(name: str) -> None:
    """UsageError when `name` (a preset or a model directory) holds a model type fastprefix cannot patch."""
    from .models import REGISTRY, supported_families

    unsupported = [t for t in model_types(name) if t not in REGISTRY]
    if unsupported:
        raise UsageError(f"argument --model: {name} holds a {unsupported[0]!r} model, which fastprefix does not "
                         f"support; supported: {supported_families()}")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info(args, device: torch.device) -> int:
    from .dispatch import BACKENDS, implementations, unavailable_reasons

    for package in ("fastprefix", "torch", "triton", "transformers", "peft"):
        print(f"{package:<13}{_version(package)}")
    print(f"{'devices':<13}{', '.join(available_devices())}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU in use"
    print(f"{'device':<13}{device} ({gpu})")
    print("backends (and the implementations of each, in the order `auto` tries them):")
    for name in BACKENDS:
        reasons = unavailable_reasons(name, device)
        print(f"  {name:<11}" + ("usable" if not reasons else "unusable: " + "; ".join(reasons)))
        for implementation in implementations(name):
            print(f"    {implementation.name + ':':<16}{implementation.limits()}")
    return 0


def check(args, device: torch.device) -> int:
    from .dispatch import BACKENDS, unavailable_reasons
    from .testing import Case, compare_to_oracle, make_inputs

    cases = [
        Case(B=2, Hq=4, Hkv=4, N=17, S=17, P=7, D=64, causal=True),
        Case(B=2, Hq=4, Hkv=2, N=5, S=33, P=16, D=80, shared=False, mask="rows"),
        Case(B=3, Hq=6, Hkv=1, N=1, S=40, P=20, D=128),
        Case(B=2, Hq=4, Hkv=2, N=9, S=9, P=5, D=64, bias="heads", bias_grad=True),
    ]
    backends = [b for b in BACKENDS if b != "reference" and not unavailable_reasons(b, device)]
    failures = 0
    for backend in backends:
        for dtype in CHECK_DTYPES:
            for case in cases:
                inputs = make_inputs(case, getattr(torch, dtype), device)
                try:
                    bad = [str(c) for c in compare_to_oracle(inputs, backend) if not c.ok]
                except AssertionError as error:
                    bad = [str(error)]
                failures += bool(bad)
                print(f"{backend:<8}{dtype:<10}{case}  {'ok' if not bad else 'FAIL ' + '; '.join(bad)}")
    checked = len(backends) * len(CHECK_DTYPES) * len(cases)
    print(f"{checked - failures}/{checked} checks passed (forward, lse and all gradients vs the float64 oracle)"
          f" on {device}; backends checked: {', '.join(backends)}")
    return 1 if failures else 0


def _progress_bar(total=None, description=""):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True,
                bar_format="{desc}{percentage:3.0f}%|{bar}| {elapsed} elapsed, {remaining} left")


def _bench_rows(s, progress, load):
    """(rows, notes, the attention sweep's shape, the name of the model it is shaped as) of one bench run."""
    from . import bench as b
    from .presets import load_models

    progress.set_description(f"loading {PRESET_LABELS.get(s.model, s.model)}")
    models = load_models(s.model)
    progress.set_description("building the workloads, each variant checked against its oracle")
    workloads = [w for model in models for w in b.model_workloads(model, s)]
    shape = b.attention_shape(models[0])
    workloads += [b.op_workload(batch, prefix_len, s, shape) for batch, prefix_len in b.sweep_points(s)]
    rows = b.measure(workloads, s, progress, load)
    return rows, [note for w in workloads for note in w.notes], shape, b.model_name(models[0], s)


def _bench_header(s, env: dict, shape, shaped_as: str, load, seconds: float) -> str:
    runs = (f"{s.repeats} each" if s.repeats else
            f"as many as fit {s.budget_seconds:.0f} s for all variants (3 to 11 each)")
    return (f"fastprefix bench: {PRESET_LABELS.get(s.model, s.model)} on {env['device']}, {s.dtype}, batch {s.batch}, "
            f"prefix {s.prefix_len}, sequence {s.seq_len}; commit {env['commit']}, {env['date']}\n"
            f"timed runs per variant: {runs}; {seconds:.0f} s in all\n"
            f"machine: {load.describe()}\n"
            f"attention sweep: one attention layer shaped as {shaped_as}'s ({shape})")


def bench(args, device: torch.device) -> int:
    from . import bench as b
    from .bench_report import environment, format_table, plot, run_warning, write_json
    from .quiet import hide_progress_bars, others_warnings_hidden
    from .timing import Load

    started, load = time.perf_counter(), Load()
    load.probe()
    s = b.Settings(model=args.model, device=str(device), dtype=args.dtype, batch=args.batch,
                   prefix_len=args.prefix_len, seq_len=args.seq_len, repeats=args.repeats)
    if not args.verbose:
        hide_progress_bars()
    with others_warnings_hidden(args.verbose) as hidden, _progress_bar() as progress:
        rows, notes, shape, shaped_as = _bench_rows(s, progress, load)
    load.sample()
    print(_bench_header(s, environment(s), shape, shaped_as, load, time.perf_counter() - started))
    print(format_table(rows, notes))
    warning = run_warning(rows, load)
    if warning:
        print(warning)
    if args.json:
        write_json(args.json, rows, s, load, notes)
        print(f"wrote the results as JSON to {os.path.abspath(args.json)}")
    if args.plot:
        plot(args.plot, rows, s, shape)
        print(f"wrote the attention sweep's figure to {os.path.abspath(args.plot)}")
    if hidden.summary():
        print(hidden.summary(), file=sys.stderr)
    return 1 if any(r.matched is False and r.variant == "fastprefix" for r in rows) else 0


def demo(args, device: torch.device) -> int:
    from . import demo as d
    from .quiet import hide_progress_bars, others_warnings_hidden
    from .timing import Load, load_warnings

    load = Load()
    load.probe()
    print(f"fastprefix demo: with the defaults, on 2 quiet CPU cores, it takes {DEMO_DURATION}; this machine: "
          f"{load.describe()}", flush=True)
    for busy in load_warnings(load):
        print(f"note: {busy}: expect it to take longer", flush=True)
    if not args.verbose:
        hide_progress_bars()
    with others_warnings_hidden(args.verbose) as hidden:
        result = d.run(args.steps, args.batch, args.prefix_len, args.lr,
                       lambda total: _progress_bar(total, "training steps: "), say=lambda text: print(text, flush=True))
    d.report(result)
    if args.plot:
        d.plot(args.plot, result, f"{args.steps} steps, batch {args.batch}, prefix {args.prefix_len}")
        print(f"wrote the loss curves to {os.path.abspath(args.plot)}")
    if hidden.summary():
        print(hidden.summary(), file=sys.stderr)
    return 0


COMMANDS = {"info": info, "check": check, "bench": bench, "demo": demo}


def run(args) -> int:
    """Check the device (and, for bench, the model's type), then run the command `args.command`."""
    device = require_device(args.device) if hasattr(args, "device") else torch.device("cpu")
    if args.command == "bench":
        require_supported_model(args.model)
    return COMMANDS[args.command](args, device)
