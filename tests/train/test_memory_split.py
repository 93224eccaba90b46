"""The split estimate (train/memory_split.py) and the pool's split decision (pool/multi_gpu.py):
one card when one holds the job, the fewest GPUs together otherwise, none with a reason."""

from __future__ import annotations

import pytest

from lorapool.service.pool.multi_gpu import explain, plan_split
from lorapool.service.train import memory as M
from lorapool.service.train import memory_split as S
from lorapool.service.train.spec import DeviceInfo, TrainSpec
from lorapool.service.train.tiny import make_random_llama

GiB = 2**30

# Llama-3.1-8B's shape (config only: the estimate reads no weights).
SHAPE_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8)


@pytest.fixture(scope="module")
def model_8b(tmp_path_factory):
    return make_random_llama(tmp_path_factory.mktemp("m8b"), "1b", write_weights=False,
                             **SHAPE_8B)


def _gpu(gib: float, cc=(8, 6)) -> DeviceInfo:
    n = int(gib * GiB)
    return DeviceInfo(kind="cuda", name=f"{gib}G", total_memory=n, free_memory=n,
                      compute_capability=cc)


def _spec(model, **kw) -> TrainSpec:
    return TrainSpec(base_model=str(model), max_seq_len=kw.pop("max_seq_len", 2048), **kw)


@pytest.mark.parametrize("fast", ["auto", "off"])
def test_one_part_with_every_layer_is_the_one_card_estimate(model_8b, fast):
    """The split's terms are memory.py's: a single part holding every layer, the tables and the
    head is the calibrated one-card estimate without CUDA graphs (fast path), term by term on
    the reference path but for the first-and-last bookkeeping."""
    spec = _spec(model_8b, fast=fast)
    gpu = _gpu(24)
    whole = S.part_estimate(spec, gpu, layers=32, num_layers=32, first=True, last=True,
                            host_head=False)
    if fast == "auto":
        no_graphs = [v for v in M.fast_variants(spec, gpu) if not v.graphs and not v.host_head]
        assert whole.total == no_graphs[0].total
        streamed = S.part_estimate(spec, gpu, layers=32, num_layers=32, first=True, last=True,
                                   host_head=True)
        assert streamed.total == M.estimate_memory(spec, gpu).total  # the minimum
    else:
        one = M.estimate_memory(spec, gpu)
        assert abs(whole.total - one.total) / one.total < 0.01
        for term in ("base_weights_quantized", "lora_params", "optimizer_state", "logits"):
            assert abs(whole.breakdown[term] - one.breakdown[term]) <= 1


def test_parts_grow_with_layers_and_the_head_sits_on_the_last(model_8b):
    spec = _spec(model_8b)
    gpu = _gpu(24)
    sizes = [S.part_estimate(spec, gpu, layers=n, num_layers=32, first=False, last=False).total
             for n in (1, 8, 16)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    mid = S.part_estimate(spec, gpu, layers=8, num_layers=32, first=False, last=False)
    last = S.part_estimate(spec, gpu, layers=8, num_layers=32, first=False, last=True)
    assert mid.breakdown["logits"] == 0 < last.breakdown["logits"]
    assert last.breakdown["unquantized_params"] > mid.breakdown["unquantized_params"]  # the head
    assert "cuda_graphs_pool" not in last.breakdown


def test_fits_one_card_is_no_split(model_8b):
    spec = _spec(model_8b)
    plan = S.plan_gpus(spec, [_gpu(3), _gpu(24), _gpu(12)])
    assert plan.mode == "single"
    assert plan.gpus == (2,)  # best fit: the smallest card that holds it
    assert plan.peaks[0] <= 12 * GiB
    assert "fits one card" in plan.reason
    assert plan_split(spec, [_gpu(3), _gpu(24), _gpu(12)]) is None


def test_fits_two_cards_together_but_not_one(model_8b):
    spec = _spec(model_8b)
    gpus = [_gpu(4), _gpu(4)]
    assert all(M.estimate_memory(spec, g).total > 4 * GiB for g in gpus)  # no single card
    plan = S.plan_gpus(spec, gpus)
    assert plan.mode == "split" and plan.gpus == (0, 1)
    # Contiguous ranges covering every decoder layer, each GPU at least one.
    assert plan.layers[0][0] == 0 and plan.layers[-1][1] == 32
    assert all(a[1] == b[0] for a, b in zip(plan.layers, plan.layers[1:]))
    assert all(n >= 1 for n in plan.layer_counts)
    assert all(peak <= 4 * GiB for peak in plan.peaks)
    # The last GPU holds the head and loss, so it takes fewer layers than the first.
    assert plan.layer_counts[1] < plan.layer_counts[0]
    assert "split over 2 GPUs" in plan.reason and "layers 0-" in plan.reason

    node = plan_split(spec, gpus, safety_margin=0.0)
    assert node is not None and node.num_gpus == 2
    assert node.layers == plan.layers and node.peaks == plan.peaks
    sp = node.split_spec()
    assert sp.devices == ["cuda:0", "cuda:1"] and sum(sp.layers) == 32
    assert node.split_spec(["cuda:0", "cuda:1"]).budgets == list(plan.peaks)


def test_the_fewest_largest_gpus_are_taken(model_8b):
    spec = _spec(model_8b)
    plan = S.plan_gpus(spec, [_gpu(1), _gpu(4), _gpu(2), _gpu(4)])
    assert plan.mode == "split" and sorted(plan.gpus) == [1, 3]
    three = S.plan_gpus(spec, [_gpu(3), _gpu(3), _gpu(3)])
    assert three.mode == "split" and len(three.gpus) == 3  # two 3 GiB cards are not enough
    assert S.plan_gpus(spec, [_gpu(3), _gpu(3), _gpu(3)], max_gpus=2).mode == "none"


def test_margin_is_applied_per_gpu(model_8b):
    spec = _spec(model_8b)
    plan = S.plan_gpus(spec, [_gpu(4), _gpu(4)], margin=0.1)
    assert plan.mode == "split"
    assert all(p * 1.1 <= 4 * GiB for p in plan.peaks)


def test_fits_nowhere_is_none_with_a_reason(model_8b):
    spec = _spec(model_8b)
    gpus = [_gpu(1.5), _gpu(1.5)]
    plan = S.plan_gpus(spec, gpus)
    assert plan.mode == "none" and plan.gpus == () and plan.parts == ()
    assert "fits no single card" in plan.reason and "not split over 2 GPUs" in plan.reason
    assert "1.50 GiB" in plan.reason
    assert plan_split(spec, gpus) is None
    assert explain(spec, gpus) == plan.reason
    assert plan_split(spec, [_gpu(1.5)]) is None
    assert "at least two GPUs" in explain(spec, [_gpu(1.5)])


def test_assign_layers_is_proportional_and_bounded():
    assert S.assign_layers([20, 12], 32) == [20, 12]
    counts = S.assign_layers([30, 30], 32)
    assert counts == [16, 16]
    counts = S.assign_layers([30, 10], 32)
    assert sum(counts) == 32 and counts[1] <= 10 and counts[0] > counts[1]
    assert S.assign_layers([10, 10], 32) is None  # not enough together
    assert S.assign_layers([40, 0], 32) is None  # a GPU that holds no layer
    assert S.assign_layers([1, 1, 1], 2) is None  # more GPUs than layers
    assert S.ranges([3, 2, 4]) == ((0, 3), (3, 5), (5, 9))
