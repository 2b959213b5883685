"""fastprefix.profiling.peak_cpu_memory, which every CPU memory figure of the benchmarks comes from."""

import subprocess
import sys

import torch

from fastprefix.profiling import peak_cpu_memory


def test_counts_what_the_call_allocates_at_its_peak_and_nothing_that_existed_before():
    existing = torch.ones(2000, 2000)

    def call():
        a = torch.ones(1000, 1000)                 # 4 MB
        b = a + existing[:1000, :1000]             # 4 MB more: peak 8 MB
        del a, b
        c = torch.ones(500, 1000)                  # 2 MB after both are freed
        return c

    assert peak_cpu_memory(call) == 8_000_000


def test_prints_nothing_of_its_own(capfd):
    """The profiler's native start/stop log lines would break the CLI's progress bar; the call's output stays."""
    peak_cpu_memory(lambda: print("from the call"))
    out, err = capfd.readouterr()
    assert out == "from the call\n" and err == ""


FREES_EARLIER_MEMORY = """
import sys, torch
from fastprefix.profiling import peak_cpu_memory
before = [torch.ones(1000)]

def call():
    before.clear()  # frees memory allocated before the profiler started: torch logs a native line about it
    print("the call's own line", file=sys.stderr)

peak_cpu_memory(call)
"""


def test_keeps_the_calls_stderr_and_drops_the_profilers_native_lines():
    """In a fresh process, since the profiler logs its line about earlier memory once per process."""
    proc = subprocess.run([sys.executable, "-c", FREES_EARLIER_MEMORY], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "the call's own line\n"
