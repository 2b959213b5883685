"""The `fastprefix` command line: `info` and `check`."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

import torch

from .backends import BACKENDS, unavailable_reasons
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
    print("backends:")
    for name in BACKENDS:
        reasons = unavailable_reasons(name, device)
        print(f"  {name:<11}" + ("usable" if not reasons else "unusable: " + "; ".join(reasons)))
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastprefix", description="Attention with a prefix, never materialized.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn, help_text, example in (
        ("info", info, "versions, device, and which backends are usable here (and why not)", "fastprefix info"),
        ("check", check, "every usable backend vs the float64 oracle on random inputs; exit 1 on a mismatch",
         "fastprefix check --device cuda"),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=f"example: {example}")
        sub.add_argument("--device", type=_device_arg, help="torch device (default: cuda if available, else cpu)")
        sub.set_defaults(run=fn)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
