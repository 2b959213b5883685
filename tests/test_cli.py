"""The `fastprefix` command line."""

import json

import pytest
import torch

from fastprefix import cli, torch_path


def test_info_names_usable_backends_and_why_not(capsys):
    assert cli.main(["info"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert lines["torch"].split()[1] == "usable" and lines["reference"].split()[1] == "usable"
    assert "unusable:" in lines["triton"]


def test_check_passes_here(capsys):
    assert cli.main(["check"]) == 0
    assert "12/12 checks passed" in capsys.readouterr().out


def test_check_fails_on_a_broken_backend(monkeypatch, capsys):
    merge = torch_path.merge_lse

    def merge_slightly_wrong(parts):
        out, lse = merge(parts)
        return out * 1.001, lse

    monkeypatch.setattr(torch_path, "merge_lse", merge_slightly_wrong)
    assert cli.main(["check"]) == 1
    assert "FAIL out: relative error" in capsys.readouterr().out


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
    assert "llama train step" in table and "attention fwd+bwd" in table
    result = json.loads(out_json.read_text())
    assert result["environment"]["versions"]["torch"] == torch.__version__
    assert result["settings"]["batch"] == 2
    rows = result["rows"]
    assert {r["variant"] for r in rows} == {"fastprefix", "peft", "no prefix"}
    for r in rows:
        assert r["seconds"] > 0 and r["tokens_per_second"] > 0 and r["peak_bytes"] > 0, r
    assert all(r["matched"] for r in rows if r["variant"] == "fastprefix")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
