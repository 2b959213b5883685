"""What every CPU benchmark here shares: one thread, so that the process's CPU time (each file's timer,
`time.process_time`) measures the work itself, not other jobs on a shared machine stalling a second
thread's barriers."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
