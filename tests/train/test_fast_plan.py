"""resolve_fast / prepare_for_fast / apply_fast_path choices on the CPU."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from lorapool.service.train import LoraSpec, TrainSpec
from lorapool.service.train.fast import (
    PIECES,
    FastPlan,
    apply_fast_path,
    fast_switches,
    prepare_for_fast,
    resolve_fast,
)

CPU = torch.device("cpu")


def _spec(fast=None, **kw) -> TrainSpec:
    if fast is not None:
        kw["fast"] = fast
    return TrainSpec(base_model="unused", device="cpu", **kw)


def test_auto_on_cpu_is_the_reference_path_plus_chunked_loss():
    plan = resolve_fast(_spec(), CPU)
    assert not (plan.fused_lora or plan.offload_activations or plan.kernels or plan.padding_free)
    assert plan.chunked_loss
    assert set(plan.reasons) == set(PIECES)
    assert plan.reasons["fused_lora"].startswith("off:")
    assert plan.reasons["chunked_loss"].startswith("on")
    d = plan.as_dict()
    assert d["chunked_loss"] is True and d["reasons"] == plan.reasons
    assert prepare_for_fast(plan, _spec()) == {}


def test_off_turns_everything_off():
    plan = resolve_fast(_spec("off"), CPU)
    assert not any(getattr(plan, p) for p in PIECES)


def test_on_forces_what_can_run_on_cpu():
    on = {p: "on" for p in PIECES}
    plan = resolve_fast(_spec(on), CPU)
    assert plan.fused_lora and plan.offload_activations and plan.padding_free and plan.chunked_loss
    assert not plan.kernels  # Triton kernels cannot run on the CPU ...
    assert "CUDA" in plan.reasons["kernels"]  # ... and the plan says why
    assert prepare_for_fast(plan, _spec(on)) == {"attn_implementation": "lorapool_doc_attention"}


@pytest.mark.parametrize("piece,kw,why", [
    ("fused_lora", {"quantization": "none"}, "nf4/fp4"),
    ("fused_lora", {"quantization": "int8"}, "nf4/fp4"),
    ("fused_lora", {"lora": LoraSpec(use_dora=True)}, "DoRA"),
    ("offload_activations", {"gradient_checkpointing": False}, "gradient_checkpointing"),
])
def test_on_where_impossible_is_off_with_reason(piece, kw, why):
    plan = resolve_fast(_spec({piece: "on"}, **kw), CPU)
    assert getattr(plan, piece) is False
    assert plan.reasons[piece].startswith("off:") and why in plan.reasons[piece]


def test_switch_forms_and_bad_values():
    assert fast_switches(_spec()) == {p: "auto" for p in PIECES}
    assert fast_switches(_spec({"kernels": "off"}))["kernels"] == "off"
    # A plain object carrying `fast` (what the trainer may hand over before validation).
    assert fast_switches(SimpleNamespace(fast="off")) == {p: "off" for p in PIECES}
    with pytest.raises(ValueError, match="kernels"):
        fast_switches(SimpleNamespace(fast={"kernels": "maybe"}))
    with pytest.raises(ValueError, match="no_such_piece"):
        fast_switches(SimpleNamespace(fast={"no_such_piece": "on"}))
    with pytest.raises(ValueError):
        fast_switches(SimpleNamespace(fast="fast please"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolve_fast(_spec(), CPU).fused_lora = True  # the plan is frozen


def test_apply_fast_path_records_what_it_did(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from lorapool.service.train.fast.attention import DOC_ATTENTION
    from lorapool.service.train.model import attach_lora, load_base_model

    spec = _spec({"fused_lora": "on", "offload_activations": "on", "padding_free": "on",
                  "kernels": "on"}, lora=LoraSpec(r=4, alpha=8))
    spec = spec.model_copy(update={"base_model": str(tiny_model_dir)})
    plan = resolve_fast(spec, CPU)
    assert isinstance(plan, FastPlan)
    model, _ = load_base_model(spec)  # loaded without prepare_for_fast's kwargs on purpose
    model = attach_lora(model, spec)
    apply_fast_path(model, plan, spec, CPU)
    done = model.lorapool_fast
    assert done["fused_lora"].startswith("14 ")
    assert done["offload_activations"].startswith("2 ")
    assert "kernels" not in done
    assert model.get_base_model().config._attn_implementation == DOC_ATTENTION
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    model.train()
    out = model(input_ids=ids, position_ids=pos, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_plan_has_one_field_per_switch_in_the_specs_order():
    from dataclasses import fields

    from lorapool.service.train.spec import FAST_PIECES, FastPlan

    assert tuple(f.name for f in fields(FastPlan)) == (*FAST_PIECES, "reasons")
