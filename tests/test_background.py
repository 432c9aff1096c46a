"""core.background: one job at a time beside the main thread, errors surfaced there."""

import threading
import time

import pytest

from em_circuits.core.background import BackgroundJobs


def test_jobs_run_one_at_a_time_in_order_off_the_main_thread():
    jobs = BackgroundJobs("test")
    seen: list[tuple[int, str]] = []
    running = threading.Event()

    def job(i: int) -> None:
        assert not running.is_set()  # never two at once
        running.set()
        time.sleep(0.01)
        seen.append((i, threading.current_thread().name))
        running.clear()

    for i in range(4):
        jobs.submit(lambda i=i: job(i))
    jobs.close()
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert all(name != threading.main_thread().name for _, name in seen)


def test_a_failed_job_raises_in_the_main_thread_and_close_still_waits():
    jobs = BackgroundJobs("test")
    jobs.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        jobs.submit(lambda: None)  # the next submit reports the failure first
    finished = threading.Event()
    jobs.submit(lambda: (time.sleep(0.05), finished.set()))
    jobs.close()
    assert finished.is_set()
