"""The `fastprefix` command line."""

import pytest

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
