"""`estimated_finish`: the mean of recent step times × the steps left, written to the job by a
store subscriber (a real SQLite store, no Ray)."""

from __future__ import annotations

from collections import deque

from lorapool.service.pool.progress import ProgressEstimator, estimate
from lorapool.service.store import Store
from lorapool.service.store.records import EventRecord, JobRecord


def test_estimate_is_mean_step_time_times_steps_left():
    w = deque([(100.0, 1), (102.0, 2), (104.0, 3)])
    assert estimate(w, 10) == 104.0 + 2.0 * 7
    assert estimate(deque([(100.0, 1)]), 10) is None  # one step: no step time yet


def test_step_events_set_estimated_finish_and_a_restart_starts_afresh(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_job(JobRecord(id="ftjob-1", tenant="t", model="m", status="running"))
    est = ProgressEstimator()
    est.store = store

    def step(at: float, n: int) -> None:
        ev = EventRecord(id=f"e{at}", job_id="ftjob-1", created_at=int(at), type="metrics",
                         message="", data={"step": n, "total_steps": 10})
        est.handle("job:ftjob-1", ev, at)
        est._written.clear()  # the once-a-second write limit is wall time; not under test here

    step(1000.0, 1)
    assert store.get_job("ftjob-1").estimated_finish is None
    step(1003.0, 2)
    assert store.get_job("ftjob-1").estimated_finish == 1003 + 3 * 8
    # Resumed from a checkpoint at step 1 (after a model load): the old window is dropped.
    step(2000.0, 1)
    step(2001.0, 2)
    assert store.get_job("ftjob-1").estimated_finish == 2001 + 1 * 8
    # An eval event carries no total_steps and changes nothing.
    est.handle("job:ftjob-1", EventRecord(id="ev", job_id="ftjob-1", created_at=0,
                                          type="metrics", message="", data={"step": 2,
                                                                            "valid_loss": 1.0}), 1)
    assert store.get_job("ftjob-1").estimated_finish == 2001 + 8
    store.close()


def test_queue_full_drops_instead_of_blocking_the_writer():
    est = ProgressEstimator(maxsize=2)
    for i in range(5):
        est.listener("job:x", i)  # no worker running: the queue fills up
    assert est.queue.qsize() == 2 and est.dropped == 3
