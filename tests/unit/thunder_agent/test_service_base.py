"""Periodic jobs: own cadence each, jitter within bounds, errors survive."""

import random
import threading
import time

from thunder_agent import service_base


def test_jittered_delays_stay_within_ten_percent():
    job = service_base.PeriodicJob('hb', lambda: None, lambda: 10,
                                   jitter=True, rng=random.Random(7))
    firsts = [job.first_delay() for _ in range(200)]
    assert 0 <= min(firsts) and max(firsts) <= 10
    # Spread over the interval, not bunched.
    assert max(firsts) - min(firsts) > 8
    nexts = [job.next_delay() for _ in range(200)]
    assert 9 <= min(nexts) and max(nexts) <= 11 and len(set(nexts)) > 100


def test_plain_jobs_keep_their_interval_and_reread_it():
    interval = [5]
    job = service_base.PeriodicJob('gc', lambda: None, lambda: interval[0])
    assert job.first_delay() == 5 and job.next_delay() == 5
    interval[0] = 7
    assert job.next_delay() == 7


def test_an_error_is_logged_and_the_job_goes_on():
    runs = []

    def work():
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError('boom')
    job = service_base.PeriodicJob('flaky', work, lambda: 0.01)
    assert job.run_once() == 0.01
    assert job.run_once() == 0.01
    assert len(runs) == 2


def test_started_jobs_run_on_their_own_cadence():
    counts = {'fast': 0, 'slow': 0}
    done = threading.Event()

    def tick(name):
        counts[name] += 1
        if counts['fast'] >= 10:
            done.set()
    jobs = [service_base.PeriodicJob('fast', lambda: tick('fast'),
                                     lambda: 0.01).start(),
            service_base.PeriodicJob('slow', lambda: tick('slow'),
                                     lambda: 5).start()]
    assert done.wait(10)
    for job in jobs:
        job.stop()
    for job in jobs:
        job.wait()
    assert counts['fast'] >= 10 and counts['slow'] == 0
    time.sleep(0.05)
