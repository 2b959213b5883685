"""What every CPU benchmark here shares: one thread, so that the process's CPU time (each file's timer,
`time.process_time`) measures the work itself, not other jobs on a shared machine stalling a second
thread's barriers."""

import time

import pytest
import torch

from fastprefix.profiling import peak_cpu_memory


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def timed_once(benchmark):
    """measure(run) -> (run()'s result, its peak memory in bytes, its CPU seconds): an untimed call measures the
    peak memory (fastprefix.profiling), then one call is timed by the process's CPU time as the benchmark's only
    round (a generation run is long enough to time once)."""

    def measure(run):
        peak = peak_cpu_memory(run)
        found = []

        def timed():
            start = time.process_time()
            result = run()
            found.append((result, time.process_time() - start))

        benchmark.pedantic(timed, rounds=1, warmup_rounds=0)
        result, seconds = found[0]
        return result, peak, seconds

    return measure

