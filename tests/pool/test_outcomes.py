"""The runner → scheduler messages and the outcome → transition table (service/pool/outcomes.py).

Pure data: no Ray, no store. The cluster tests (test_cluster, test_storm, test_chaos) check the
same endings end to end; these pin each rule on its own.
"""

from __future__ import annotations

import pickle

import pytest

from lorapool.service.pool.outcomes import (
    TRANSITIONS,
    AdapterNotStored,
    AdapterStored,
    CancelOverdue,
    Completed,
    Failed,
    JobContext,
    Lost,
    RunnerEvent,
    RunnerItem,
    ServiceRestarted,
    ServiceStopped,
    Stopped,
    result_from_wire,
    result_to_wire,
    transition_for,
)
from lorapool.service.train.events import TrainEvent


def ctx(attempt: int = 0, max_attempts: int = 3, **kw) -> JobContext:
    return JobContext("ftjob-1", "desk1", attempt, max_attempts, **kw)


# -- messages ------------------------------------------------------------------------------------


def test_an_item_built_from_a_train_event_round_trips_through_its_wire_form_and_pickle():
    ev = TrainEvent(type="checkpoint", step=7, total_steps=20, loss=1.25, message="saved",
                    path="/node/only/ckpt", data={"k": 1})
    item = RunnerItem(RunnerEvent.from_train_event(ev), {"adapter_model.safetensors": b"x"})
    assert item.event.step == 7 and item.event.loss == 1.25 and item.event.data == {"k": 1}
    wire = item.to_wire()
    assert "path" not in wire["event"]  # a node's path means nothing on the head
    assert RunnerItem.from_wire(wire) == item
    assert pickle.loads(pickle.dumps(item)) == item  # what Ray does to it
    assert RunnerItem.from_wire(item) is item


def test_a_dict_item_from_the_multi_worker_runner_parses_with_missing_fields():
    item = RunnerItem.from_wire({"kind": "event", "event": {
        "type": "status", "step": 3, "message": "growing", "data": {"distributed": {"n": 2}}}})
    assert (item.event.type, item.event.step, item.event.loss, item.files) == (
        "status", 3, None, None)
    assert item.event.data == {"distributed": {"n": 2}}


@pytest.mark.parametrize("result", [
    Completed(step=10, total_steps=10, metrics={"trained_tokens": 99}, peak_memory=123,
              adapter_files={"adapter_model.safetensors": b"a"}),
    Stopped(step=4, stop_reason="cancelled by user", checkpoint_files={"x": b"c"}, phase=None),
    Stopped(step=0, phase="setup"),
    Failed(code="data_error", message="bad line 3", retryable=False),
    Failed(code="oom", message="out of memory", retryable=True, traceback="tb"),
])
def test_every_result_kind_round_trips_through_its_dict_form_and_pickle(result):
    wire = result_to_wire(result)
    assert wire["status"] == result.status
    assert result_from_wire(wire) == result
    assert result_from_wire(result) is result
    assert pickle.loads(pickle.dumps(result)) == result


def test_a_dict_result_parses_like_the_old_code_read_it():
    r = result_from_wire({"status": "failed", "message": "boom", "retryable": 1,
                          "seconds": 2.0})
    assert isinstance(r, Failed) and (r.code, r.message, r.retryable) == (
        "internal_error", "boom", True)
    # An unknown status was the old `else` branch: a failure.
    weird = result_from_wire({"status": "exploded"})
    assert isinstance(weird, Failed) and not weird.retryable
    # The multi-worker runner's extra fields survive.
    done = result_from_wire({"status": "completed", "adapter_files": {"a": b"1"},
                             "workers": [{"rank": 0}], "metrics": None})
    assert isinstance(done, Completed) and done.workers == [{"rank": 0}] and done.metrics == {}


# -- the table -----------------------------------------------------------------------------------


def test_every_outcome_kind_has_a_rule_and_an_unknown_one_is_refused():
    assert set(TRANSITIONS) == {AdapterStored, AdapterNotStored, Stopped, Failed, Lost,
                                CancelOverdue, ServiceStopped, ServiceRestarted}
    with pytest.raises(TypeError, match="Completed"):
        transition_for(Completed(), ctx())  # its adapter must be stored first


def test_a_stored_adapter_succeeds_the_job_with_its_metrics():
    done = Completed(step=10, metrics={"trained_tokens": 512, "loss": 0.5, "hist": [1]},
                     peak_memory=2048, adapter_files={"a": b"1"})
    t = transition_for(AdapterStored(done, "ft-adapter-1"), ctx())
    assert (t.status, t.level, t.requeue, t.finished) == ("succeeded", "info", False, True)
    assert t.message == "Training finished: adapter ft-adapter-1"
    assert t.data == {"trained_tokens": 512, "loss": 0.5}  # scalars only in the event
    assert t.fields == {"fine_tuned_model": "ft-adapter-1", "adapter_id": "ft-adapter-1",
                        "trained_tokens": 512, "measured_peak_memory": 2048, "step": 10}


def test_an_adapter_the_store_refused_fails_the_job_as_a_storage_error():
    t = transition_for(AdapterNotStored(Completed(peak_memory=7), "disk full"), ctx())
    assert (t.status, t.level) == ("failed", "error")
    assert t.fields == {"error_code": "storage_error", "measured_peak_memory": 7,
                        "error_message": "the adapter could not be stored: disk full"}
    assert "disk full" in t.message and "checkpoints stay downloadable" in t.message


@pytest.mark.parametrize("in_store,sent", [(True, False), (False, True), (True, True)])
def test_a_stop_after_a_cancel_ends_cancelled(in_store, sent):
    t = transition_for(Stopped(step=5, peak_memory=9, stop_reason="owner came back"),
                       ctx(cancel_in_store=in_store, cancel_sent=sent))
    assert (t.status, t.requeue) == ("cancelled", False)
    assert t.message.startswith("Job cancelled at step 5")
    assert t.fields == {"measured_peak_memory": 9}


def test_a_stop_without_a_cancel_requeues_with_its_reason_and_avoids_the_node():
    t = transition_for(Stopped(step=5, stop_reason="preempted"),
                       ctx(attempt=1, last_checkpoint_step=4))
    assert (t.status, t.requeue, t.avoid_node, t.level) == ("queued", True, True, "warn")
    assert t.fields == {"node_id": None, "attempt": 2}
    assert t.data == {"reason": "preempted", "attempt": 2, "resume_step": 4}
    assert t.message == ("Attempt 2 ended on desk1: preempted; requeued from the last "
                         "checkpoint (step 4)")
    assert "stopped by its node" in transition_for(Stopped(), ctx()).message


def test_a_retryable_failure_requeues_under_max_attempts_and_fails_at_it():
    oom = Failed(code="oom", message="CUDA out of memory", retryable=True, peak_memory=5)
    under = transition_for(oom, ctx(attempt=1, max_attempts=3))
    assert under.requeue and under.data["reason"] == "oom: CUDA out of memory"
    over = transition_for(oom, ctx(attempt=2, max_attempts=3))
    assert (over.status, over.level, over.data) == ("failed", "error", {"code": "oom"})
    assert over.fields == {"error_code": "oom", "error_message": "CUDA out of memory",
                           "measured_peak_memory": 5}


def test_a_job_s_own_failure_fails_at_once():
    t = transition_for(Failed(code="data_error", message="line 3: no messages"),
                       ctx(attempt=0, max_attempts=5))
    assert (t.status, t.message) == ("failed", "Job failed: line 3: no messages")


def test_a_lost_runner_requeues_until_max_attempts_then_fails_as_node_lost():
    assert transition_for(Lost("node desk1 lost"), ctx(attempt=0)).requeue
    t = transition_for(Lost("node desk1 lost"), ctx(attempt=2, max_attempts=3))
    assert (t.status, t.fields) == ("failed", {"error_code": "node_lost",
                                               "error_message": "node desk1 lost"})


def test_a_cancel_in_the_store_wins_over_a_requeue_when_the_runner_is_lost():
    t = transition_for(Lost("node desk1 lost"), ctx(attempt=0, cancel_in_store=True))
    assert (t.status, t.message) == ("cancelled", "Job cancelled (node desk1 lost)")


def test_an_overdue_cancel_ends_cancelled_naming_the_timeout_and_checkpoint():
    t = transition_for(CancelOverdue(4.0), ctx(last_checkpoint_step=6, cancel_sent=True))
    assert (t.status, t.level, t.event_always) == ("cancelled", "warn", False)
    assert "within 4 s" in t.message and "(step 6)" in t.message


def test_the_service_stopping_requeues_on_the_same_node_or_cancels_if_asked():
    t = transition_for(ServiceStopped(), ctx(attempt=1))
    assert (t.status, t.avoid_node, t.fields) == ("queued", False, {"node_id": None,
                                                                    "attempt": 2})
    assert t.message.startswith("The service stopped; attempt 2 on desk1")
    assert transition_for(ServiceStopped(), ctx(cancel_sent=True)).status == "cancelled"
    restarted = transition_for(ServiceRestarted(), ctx(attempt=0))
    assert restarted.requeue and restarted.message.startswith("The service restarted; attempt 1")
