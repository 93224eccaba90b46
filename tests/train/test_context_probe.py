"""The node's CUDA-context probe (service/train/context_probe.py)."""

from __future__ import annotations

import pytest
import torch

from lorapool.service.train import DeviceInfo, LoraSpec, TrainSpec, estimate_memory
from lorapool.service.train.context_probe import (
    MAX_CONTEXT_BYTES,
    MIN_CONTEXT_BYTES,
    context_from,
    measure_context_bytes,
)

GiB = 1024**3


def test_context_is_what_the_driver_lost_beyond_the_childs_reserved_memory():
    assert context_from(10 * GiB, 8 * GiB, GiB) == GiB
    # Readings no context can explain (another process freed or took memory meanwhile).
    assert context_from(10 * GiB, 10 * GiB, GiB) is None
    assert context_from(10 * GiB, 10 * GiB - MIN_CONTEXT_BYTES // 2, 0) is None
    assert context_from(10 * GiB, 10 * GiB - MAX_CONTEXT_BYTES - GiB, 0) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer")
def test_no_probe_without_a_cuda_gpu():
    assert measure_context_bytes(0) is None


def test_a_measured_context_replaces_the_estimates_constant(tiny_model_dir):
    spec = TrainSpec(base_model=str(tiny_model_dir), device="cuda", lora=LoraSpec(r=4, alpha=8))
    card = dict(kind="cuda", name="card", total_memory=8 * GiB, compute_capability=(8, 6))
    default = estimate_memory(spec, DeviceInfo(**card))
    measured = estimate_memory(spec, DeviceInfo(**card, context_bytes=GiB))
    assert measured.breakdown["cuda_context"] == GiB
    assert measured.total - default.total == GiB - default.breakdown["cuda_context"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_probe_measures_a_real_context():
    context = measure_context_bytes(0)
    assert context is not None and 0.2 * GiB < context < 2 * GiB, context


def test_the_reference_path_uses_the_measured_context_too(tiny_model_dir):
    spec = TrainSpec(base_model=str(tiny_model_dir), device="cuda", lora=LoraSpec(r=4, alpha=8),
                     fast="off")
    card = dict(kind="cuda", name="card", total_memory=8 * GiB, compute_capability=(8, 6))
    measured = estimate_memory(spec, DeviceInfo(**card, context_bytes=GiB))
    assert measured.breakdown["cuda_context"] == GiB
