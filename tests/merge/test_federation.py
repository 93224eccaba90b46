"""The pure federated-round logic: quorum, deadline, aggregation order and re-factorisation."""

from __future__ import annotations

import pytest
import torch

from lorapool.service.merge import MergeError, load_adapter
from lorapool.service.merge.federation import (
    RoundPolicy,
    aggregate_round,
    check_method,
    decide_round,
    weighted_mean,
)

ORDER = ("sales", "support", "legal")
P = RoundPolicy(quorum=2, deadline_s=60)


def _decide(statuses, now=10.0, policy=P, **kw):
    return decide_round(statuses, ORDER, started_at=0.0, now=now, policy=policy, **kw)


def test_waits_while_jobs_run_before_the_deadline():
    d = _decide({"sales": "succeeded", "support": "running", "legal": "queued"})
    assert d.action == "wait" and d.took_part == ("sales",)


def test_everyone_back_aggregates_in_declared_order_not_completion_order():
    d = _decide({"legal": "succeeded", "support": "succeeded", "sales": "succeeded"})
    assert d.action == "aggregate" and d.took_part == ORDER and not d.dropped and not d.late


def test_a_failed_participant_is_dropped_when_the_quorum_holds():
    d = _decide({"sales": "succeeded", "support": "failed", "legal": "succeeded"},
                errors={"support": "node lost"})
    assert d.action == "aggregate" and d.took_part == ("sales", "legal")
    assert d.dropped == {"support": "job failed: node lost"}


def test_the_deadline_cuts_stragglers_and_aggregates_with_the_quorum():
    statuses = {"sales": "succeeded", "support": "queued", "legal": "succeeded"}
    assert _decide(statuses, now=59.9).action == "wait"
    d = _decide(statuses, now=60.0)
    assert d.action == "aggregate" and d.took_part == ("sales", "legal")
    assert d.late == ("support",) and "deadline" in d.dropped["support"]


def test_the_deadline_below_quorum_fails_the_round():
    d = _decide({"sales": "succeeded", "support": "running", "legal": "running"}, now=61)
    assert d.action == "fail" and "only 1 of 3" in d.reason and "quorum is 2" in d.reason
    assert d.late == ("support", "legal")


def test_fails_early_once_the_quorum_is_out_of_reach():
    d = _decide({"sales": "failed", "support": "cancelled", "legal": "running"})
    assert d.action == "fail" and "can still finish" in d.reason


def test_all_finished_below_quorum_fails():
    d = _decide({"sales": "succeeded", "support": "failed", "legal": "failed"},
                policy=RoundPolicy(quorum=3, deadline_s=60))
    assert d.action == "fail"


def test_a_missing_status_counts_as_pending_and_unknown_names_are_refused():
    assert _decide({"sales": "succeeded", "legal": "succeeded"}).action == "wait"
    with pytest.raises(ValueError, match="not in the round"):
        _decide({"marketing": "succeeded"})
    with pytest.raises(ValueError):
        RoundPolicy(quorum=0, deadline_s=1)


def test_method_and_params_are_checked_by_name():
    check_method("ties", {"density": 0.5})
    with pytest.raises(MergeError, match="method"):
        check_method("average", {})
    with pytest.raises(MergeError, match="params.density"):
        check_method("ties", {})
    with pytest.raises(MergeError, match="params: unknown"):
        check_method("exact", {"target_rank": 2})


def _delta(folder) -> dict[str, torch.Tensor]:
    return {n: m.delta() for n, m in load_adapter(folder).modules.items()}


@pytest.fixture
def three(make_adapter):
    return [(name, make_adapter(f"fed-{name}", r=4, alpha=8, seed=i, n_examples=10 * (i + 1)))
            for i, name in enumerate(ORDER)]


def test_exact_is_refactorised_to_rank_r_with_its_error_recorded(three, tmp_path):
    agg = aggregate_round(three, method="exact", rank=4, output_dir=tmp_path / "g")
    assert agg.merged_rank == 12 and agg.rank == 4
    assert 0 < agg.refactor_error < 1
    assert load_adapter(agg.path).max_rank == 4
    # FedAvg weights from the sample counts (10, 20, 30), by participant.
    assert agg.weights == pytest.approx({"sales": 1 / 6, "support": 2 / 6, "legal": 3 / 6})
    # The error is what the SVD dropped from the exact weighted average.
    exact = aggregate_round(three, method="exact", rank=12, output_dir=tmp_path / "x")
    assert exact.refactor_error is None
    num = sum(float((_delta(agg.path)[k] - d).norm() ** 2) for k, d in _delta(exact.path).items())
    den = sum(float(d.norm() ** 2) for d in _delta(exact.path).values())
    assert (num / den) ** 0.5 == pytest.approx(agg.refactor_error, rel=1e-3)


def test_aggregation_follows_the_given_order_and_weights_by_name(three, tmp_path):
    weights = {"sales": 3.0, "support": 1.0, "legal": 0.0}
    a = aggregate_round(three, method="naive", rank=4, output_dir=tmp_path / "a", weights=weights)
    b = aggregate_round(three[::-1], method="naive", rank=4, output_dir=tmp_path / "b",
                        weights=weights)
    assert a.refactor_error is None and a.merged_rank == 4
    assert a.weights == pytest.approx({"sales": 0.75, "support": 0.25, "legal": 0.0})
    da, db = _delta(a.path), _delta(b.path)
    for k in da:  # the same weighted mean whichever order the adapters came back in
        torch.testing.assert_close(da[k], db[k], rtol=1e-5, atol=1e-7)
    assert a.deviation_from_exact > 0.01  # naive is visibly not the exact average


def test_one_returned_adapter_is_the_aggregate(three, tmp_path):
    agg = aggregate_round(three[:1], method="exact", rank=4, output_dir=tmp_path / "one")
    for k, d in _delta(three[0][1]).items():
        torch.testing.assert_close(_delta(agg.path)[k], d)
    with pytest.raises(MergeError, match="weights: none given"):
        aggregate_round(three, method="naive", rank=4, output_dir=tmp_path / "w",
                        weights={"sales": 1.0})


def test_weighted_mean_skips_missing_values():
    assert weighted_mean({"a": 1.0, "b": 3.0, "c": None}, {"a": 1, "b": 1, "c": 5}) == 2.0
    assert weighted_mean({"a": None}, {"a": 1}) is None
