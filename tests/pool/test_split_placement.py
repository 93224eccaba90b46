"""Split placement's decisions (service/pool/split_placement.py), on the placer's own views.

A job no single card holds but two GPUs of one node hold together: placed split on an idle
node, waits (and holds the node) while that node runs another job, refused at submit with
multi_gpu.explain's reason where no node's GPUs would ever hold it. No Ray: the cluster test
(tests/pool/test_split_cluster.py) runs the same decisions end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lorapool.service.pool.placement import JobView, NodeView, Placer
from lorapool.service.pool.split_placement import SplitNode, plan_splits, submit_check
from lorapool.service.train.spec import DeviceInfo, TrainSpec

MiB = 1024**2
CARD = 10 * MiB  # each simulated GPU: the job needs ~11.7 MiB on one, ~9 MiB per GPU split
MARGIN = 0.1


@pytest.fixture(scope="module")
def eight_layers(tmp_path_factory) -> Path:
    """8 decoder layers whose quantised weights outweigh one layer's activations at this
    sequence length: splitting them over two GPUs halves what each holds (config only)."""
    from lorapool.service.train.tiny import make_random_llama

    return make_random_llama(tmp_path_factory.mktemp("split") / "m", "tiny",
                             write_weights=False, **SHAPE)


SHAPE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
             num_attention_heads=4, num_key_value_heads=2)


def _spec(folder: Path, **kw) -> TrainSpec:
    fields = dict(base_model=str(folder), max_seq_len=32, batch_size=2, micro_batch_size=1,
                  max_steps=2, lora={"r": 2, "alpha": 4}, fast="off")
    return TrainSpec(**{**fields, **kw})


def _gpu(total: int = CARD, free: int | None = None) -> DeviceInfo:
    # context_bytes: a simulated card's own CUDA context (a real one's is measured), small so
    # that the model, not 600 MiB of context per GPU, decides what splits.
    return DeviceInfo(kind="cuda", name="sim", total_memory=total,
                      free_memory=total if free is None else free, compute_capability=(8, 6),
                      context_bytes=MiB)


def _node(name: str, n: int = 2, *, busy: bool = False, free: int | None = None,
          labels: dict | None = None) -> SplitNode:
    gpus = tuple(_gpu(free=free) for _ in range(n))
    view = NodeView(node_id=name, name=name, device=gpus[0], free_memory=gpus[0].free_memory,
                    labels=labels or {}, running_jobs=1 if busy else 0)
    return SplitNode(view=view, gpus=gpus, devices=tuple(["cpu"] * n),
                     reserved=tuple([CARD - (free if free is not None else CARD)] * n),
                     busy=busy)


def _job(spec: TrainSpec, job_id: str = "j1", **kw) -> JobView:
    return JobView(job_id=job_id, tenant="t", spec=spec, **kw)


def test_the_job_fits_no_single_card_but_two_together(eight_layers):
    """The premise of every test below, on the placer's own arithmetic."""
    job = _job(_spec(eight_layers))
    node = _node("duo")
    assert Placer(safety_margin=MARGIN).check_fits(job, [node.view]) is not None
    answer = submit_check(job, [node], safety_margin=MARGIN)
    assert answer.ok and answer.node == "duo" and answer.split.num_gpus == 2
    assert "runs split over 2 GPUs of duo" in answer.message


def test_an_idle_node_takes_the_split_with_its_devices(eight_layers):
    job = _job(_spec(eight_layers))
    result = plan_splits([job], [_node("duo")], safety_margin=MARGIN)
    assert [p.node for p in result.placed] == ["duo"] and not result.waiting
    p = result.placed[0]
    assert p.split.gpus == (0, 1) and sum(e - s for s, e in p.split.layers) == 8
    assert all(peak * (1 + MARGIN) <= CARD for peak in p.split.peaks)
    spec = p.split_spec()
    assert spec["devices"] == ["cpu", "cpu"] and sum(spec["layers"]) == 8
    assert spec["budgets"] == list(p.split.peaks)
    assert result.taken == {"duo"}  # placement.py does not use it this pass


def test_a_busy_node_makes_the_job_wait_and_takes_no_new_job(eight_layers):
    job = _job(_spec(eight_layers))
    # Its GPUs are free enough, but a one-card job runs there: a split needs the whole node.
    result = plan_splits([job], [_node("duo", busy=True)], safety_margin=MARGIN)
    assert not result.placed and "waits for duo" in result.waiting["j1"]
    assert result.held == {"duo": "j1"} and result.taken == {"duo"}


def test_an_idle_node_too_full_now_is_not_held_and_the_job_waits(eight_layers):
    job = _job(_spec(eight_layers))
    # Someone else's process holds half of each GPU: nothing of lorapool's to wait for.
    node = SplitNode(view=_node("duo").view, gpus=(_gpu(free=CARD // 2),) * 2,
                     devices=("cpu", "cpu"), reserved=(0, 0), busy=False)
    result = plan_splits([job], [node], safety_margin=MARGIN)
    assert not result.placed and not result.held
    assert result.waiting["j1"] == "no node's GPUs hold its split now"


def test_one_node_per_pass_oldest_first_and_constraints_hold(eight_layers):
    spec = _spec(eight_layers)
    old, new = _job(spec, "old", submitted_at=1.0), _job(spec, "new", submitted_at=2.0)
    result = plan_splits([new, old], [_node("duo")], safety_margin=MARGIN)
    assert [p.job_id for p in result.placed] == ["old"] and "new" in result.waiting
    legal = _job(spec, "legal", labels={"dept": "legal"})
    result = plan_splits([legal], [_node("duo"), _node("lduo", labels={"dept": "legal"})],
                         safety_margin=MARGIN)
    assert [p.node for p in result.placed] == ["lduo"]


def test_no_node_holds_it_split_is_refused_with_the_reason(eight_layers):
    job = _job(_spec(eight_layers, max_seq_len=2048, micro_batch_size=2))
    answer = submit_check(job, [_node("duo")], safety_margin=MARGIN)
    assert not answer.ok
    assert answer.message.startswith("split over duo's 2 GPUs: ")
    assert "not split over 2 GPUs either" in answer.message
    # A node with one GPU never splits; none with several that the job may use says so.
    pinned = _job(_spec(eight_layers), node_id="elsewhere")
    assert "no node with several GPUs" in submit_check(pinned, [_node("duo")],
                                                       safety_margin=MARGIN).message
