"""Grouped sibling QLoRA projections (fast/lora_group.py) against peft's per-projection LoRA."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from peft import LoraConfig  # noqa: E402
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit  # noqa: E402

from lorapool.service.train import LoraSpec, TrainSpec  # noqa: E402
from lorapool.service.train.fast import apply_fast_path, resolve_fast  # noqa: E402
from lorapool.service.train.fast.lora import FusedLoraLinear4bit, apply_fused_lora  # noqa: E402
from lorapool.service.train.fast.lora_group import group_siblings  # noqa: E402
from lorapool.service.train.model import _enable_checkpointing, attach_lora, load_base_model  # noqa: E402

IN = 48
OUTS = {"q_proj": 64, "k_proj": 32, "v_proj": 32}


def _proj(out: int, dtype: torch.dtype, r: int, seed: int) -> PeftLinear4bit:
    torch.manual_seed(seed)
    base = bnb.nn.Linear4bit(IN, out, bias=False, compute_dtype=dtype, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(out, IN) * 0.1, requires_grad=False,
                                    quant_type="nf4")
    base = base.to("cpu")
    base.support_avx512bf16_for_cpu = False  # see model._disable_cpu_weight_packing
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["x"])
    layer = PeftLinear4bit(base, "default", config=cfg, r=r, lora_alpha=2 * r, lora_dropout=0.0)
    layer.lora_A.float()
    layer.lora_B.float()
    with torch.no_grad():  # a zero B would hide every B-path error
        layer.lora_B["default"].weight.normal_(0, 0.1)
    layer.train()
    return layer


class Attn(torch.nn.Module):
    """q/k/v siblings (ranks differ, so every slice offset is exercised) reading one input."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        for i, (name, out) in enumerate(OUTS.items()):
            setattr(self, name, _proj(out, dtype, r=4 + 2 * i, seed=i))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return torch.cat([q * 1.0, k * 2.0, v * 3.0], dim=-1)


def _params(m: Attn) -> dict[str, torch.Tensor]:
    return {n: p for n, p in m.named_parameters() if "lora_" in n}


def _run(m: Attn, x: torch.Tensor):
    for p in m.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = m(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
    return y.detach().float(), x.grad.float(), {n: p.grad.clone() for n, p in _params(m).items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_matches_peft(dtype, tol):
    m = Attn(dtype)
    x = torch.randn(2, 5, IN).to(dtype)
    ref_y, ref_dx, ref_g = _run(m, x)
    assert apply_fused_lora(m) == 3
    assert group_siblings(m, FusedLoraLinear4bit) == 1
    y, dx, g = _run(m, x)
    assert _rel(y, ref_y) < tol
    assert _rel(dx, ref_dx) < tol
    assert g.keys() == ref_g.keys()
    for name in g:
        assert g[name].dtype == torch.float32, name  # fp32 master-weight grads
        assert _rel(g[name], ref_g[name]) < tol, (name, _rel(g[name], ref_g[name]))


def test_one_node_serves_all_three_and_only_on_the_same_input():
    m = Attn(torch.float32)
    apply_fused_lora(m)
    group_siblings(m, FusedLoraLinear4bit)
    x = torch.randn(3, IN, requires_grad=True)
    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    assert type(q.grad_fn).__name__ == "LoraGroupFunctionBackward"
    assert q.grad_fn is k.grad_fn is v.grad_fn  # one node
    # A sibling called on another tensor computes its own output (and the right one).
    other = torch.randn(3, IN)
    k_other = m.k_proj(other)
    assert k_other.grad_fn is not q.grad_fn
    m.k_proj.__dict__.pop("_lorapool_group")  # k alone: the plain fused path answers
    assert torch.allclose(k_other, m.k_proj(other))


def test_an_in_place_change_of_the_input_is_not_served_from_the_group():
    m = Attn(torch.float32)
    apply_fused_lora(m)
    group_siblings(m, FusedLoraLinear4bit)
    x = torch.randn(3, IN)
    with torch.no_grad():
        m.q_proj(x)
        x.mul_(2.0)  # bumps x's version: k must not get the output computed on the old x
        k = m.k_proj(x)
        m.k_proj.__dict__.pop("_lorapool_group")
        assert torch.allclose(k, m.k_proj(x))


def test_dropout_keeps_projections_apart():
    m = Attn(torch.float32)
    for name in OUTS:
        getattr(m, name).lora_dropout["default"] = torch.nn.Dropout(0.3)
    apply_fused_lora(m)
    group_siblings(m, FusedLoraLinear4bit)
    x = torch.randn(3, IN, requires_grad=True)
    q, k = m.q_proj(x), m.k_proj(x)
    assert type(q.grad_fn).__name__ == "FusedLoraFunctionBackward"
    assert q.grad_fn is not k.grad_fn


def _spec(model_dir, fast, dropout=0.0) -> TrainSpec:
    return TrainSpec(base_model=str(model_dir), device="cpu", quantization="nf4",
                     lora=LoraSpec(r=4, alpha=8, dropout=dropout), fast=fast)


def test_plan_turns_grouping_off_with_dropout_or_without_fused(tiny_model_dir):
    cpu = torch.device("cpu")
    on = resolve_fast(_spec(tiny_model_dir, {"fused_lora": "on", "grouped_lora": "on"}), cpu)
    assert on.grouped_lora, on.reasons
    drop = resolve_fast(_spec(tiny_model_dir, {"fused_lora": "on", "grouped_lora": "on"}, 0.1),
                        cpu)
    assert not drop.grouped_lora and "dropout" in drop.reasons["grouped_lora"]
    alone = resolve_fast(_spec(tiny_model_dir, {"fused_lora": "off", "grouped_lora": "on"}), cpu)
    assert not alone.grouped_lora and "fused_lora" in alone.reasons["grouped_lora"]


def test_grouped_model_trains_like_the_ungrouped_one(tiny_model_dir):
    """Same logits and same LoRA gradients through a whole (checkpointed) model."""
    results = []
    for grouped in ("off", "on"):
        spec = _spec(tiny_model_dir, {"fused_lora": "on", "grouped_lora": grouped})
        plan = resolve_fast(spec, torch.device("cpu"))
        model, _ = load_base_model(spec)
        torch.manual_seed(3)  # the same LoRA init on both runs
        model = attach_lora(model, spec)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        _enable_checkpointing(model)
        model.train()
        apply_fast_path(model, plan, spec, torch.device("cpu"))
        if grouped == "on":
            assert model.lorapool_fast["grouped_lora"] == "4 sibling groups"  # 2 layers x 2
        else:
            assert "grouped_lora" not in model.lorapool_fast
        ids = torch.randint(0, model.config.vocab_size, (2, 12),
                            generator=torch.Generator().manual_seed(1))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), grads))
    (ref_logits, ref_grads), (logits, grads) = results
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28  # 2 layers x 7 x (A, B)
    for n in grads:
        assert _rel(grads[n], ref_grads[n]) < 1e-4, n
