"""Offloaded checkpointing changes no gradient: vs plain checkpointing vs none (with dropout)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from lorapool.service.train import LoraSpec, TrainSpec  # noqa: E402
from lorapool.service.train.fast.lora import apply_fused_lora  # noqa: E402
from lorapool.service.train.fast.offload import (  # noqa: E402
    install_offloaded_checkpointing,
    offloaded_checkpoint,
)
from lorapool.service.train.model import attach_lora, load_base_model  # noqa: E402


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    # LoRA dropout on: the recompute must replay the same masks.
    spec = TrainSpec(base_model=str(tiny_model_dir), device="cpu", quantization="nf4",
                     lora=LoraSpec(r=4, alpha=8, dropout=0.2), gradient_checkpointing=True)
    model, _ = load_base_model(spec)
    model = attach_lora(model, spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.train()
    return model


def _layers(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _grads(model, ids, seed=11):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return out.loss.detach(), grads


def _mode(model, mode: str, plain_funcs):
    for layer, func in zip(_layers(model), plain_funcs):
        layer.gradient_checkpointing = mode != "none"
        layer._gradient_checkpointing_func = func
    if mode == "offload":
        assert install_offloaded_checkpointing(model) == len(plain_funcs)


def test_offload_changes_no_gradient(lora_model):
    model = lora_model
    layers = _layers(model)
    assert len(layers) == 2 and all(lay.gradient_checkpointing for lay in layers)
    plain_funcs = [lay._gradient_checkpointing_func for lay in layers]
    ids = torch.randint(0, model.config.vocab_size, (2, 16))

    seen = []
    hook = layers[0].register_forward_hook(
        lambda mod, inp, out: seen.append(type(out.grad_fn).__name__))
    try:
        results = {}
        for mode in ("none", "plain", "offload"):
            _mode(model, mode, plain_funcs)
            seen.clear()
            results[mode] = _grads(model, ids)
            if mode == "offload":
                assert seen == ["OffloadedCheckpointBackward"]
    finally:
        hook.remove()
        _mode(model, "plain", plain_funcs)

    loss0, g0 = results["none"]
    for mode in ("plain", "offload"):
        loss, g = results[mode]
        assert torch.allclose(loss, loss0, atol=1e-6), mode
        for n in g0:
            assert torch.allclose(g[n], g0[n], atol=1e-6, rtol=1e-5), (mode, n)
    # And the test can fail: another dropout draw gives other gradients.
    _, other = _grads(model, ids, seed=12)
    assert any(not torch.allclose(other[n], g0[n], atol=1e-6) for n in g0)


def test_offload_with_fused_lora(lora_model, tiny_model_dir):
    """The two pieces together (as on the GPU) still give the reference gradients."""
    model = lora_model
    layers = _layers(model)
    plain_funcs = [lay._gradient_checkpointing_func for lay in layers]
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    _mode(model, "none", plain_funcs)
    loss0, g0 = _grads(model, ids)
    classes = {m: type(m) for m in model.modules()}
    try:
        assert apply_fused_lora(model) == 14
        _mode(model, "offload", plain_funcs)
        loss, g = _grads(model, ids)
    finally:
        for m, cls in classes.items():
            m.__class__ = cls
        _mode(model, "plain", plain_funcs)
    assert torch.allclose(loss, loss0, atol=1e-5)
    for n in g0:
        assert torch.allclose(g[n], g0[n], atol=1e-5, rtol=1e-4), n


def test_falls_back_when_input_needs_no_grad():
    """A frozen input cannot carry the gradient to the layer's own parameters through the
    custom function, so torch's checkpoint takes over and the weight still gets its grad."""
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4)
    y = offloaded_checkpoint(lin, x)
    assert type(y.grad_fn).__name__ != "OffloadedCheckpointBackward"
    y.sum().backward()
    assert lin.weight.grad is not None
