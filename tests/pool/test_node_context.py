"""A node's measured CUDA context (service/train/context_probe.py) reaches placement's estimate.
Pure policy (no Ray): the real estimator on a 1B-shaped config without weights."""

from __future__ import annotations

from lorapool.service.pool.placement import JobView, NodeView, Placer
from lorapool.service.train.memory import estimate_memory
from lorapool.service.train.spec import DeviceInfo, TrainSpec
from lorapool.service.train.tiny import make_random_llama

GiB = 1024**3


def test_a_larger_measured_context_keeps_a_job_off_a_card_it_no_longer_fits(tmp_path):
    model = make_random_llama(tmp_path / "1b", "1b", write_weights=False)
    spec = TrainSpec(base_model=str(model), max_seq_len=256, batch_size=8, fast="off",
                     micro_batch_size=1)
    card = dict(kind="cuda", name="card", total_memory=24 * GiB, compute_capability=(8, 6))
    need = estimate_memory(spec, DeviceInfo(**card)).total
    free = need + 64 * 1024**2  # fits with the estimate's constant context, 64 MiB to spare

    def view(context: int | None) -> NodeView:
        dev = DeviceInfo(**card, free_memory=free, context_bytes=context)
        return NodeView(node_id="n", name="n", device=dev, free_memory=free)

    job = JobView("j", "acme", spec)  # micro-batch 1 with checkpointing: nothing smaller to fit
    assert [p.node_id for p in Placer(safety_margin=0.0).plan([job], [view(None)], {})] == ["n"]
    # The node measured a context 0.25 GiB above the constant: the job no longer fits there.
    constant = estimate_memory(spec, DeviceInfo(**card)).breakdown["cuda_context"]
    assert Placer(safety_margin=0.0).plan([job], [view(constant + GiB // 4)], {}) == []
