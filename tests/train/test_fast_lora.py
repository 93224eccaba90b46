"""The fused QLoRA linear against peft's LoRA over a real bitsandbytes `Linear4bit`."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from peft import LoraConfig, PeftModel  # noqa: E402
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit  # noqa: E402

from lorapool.service.train import LoraSpec, TrainSpec  # noqa: E402
from lorapool.service.train.fast import apply_fast_path, resolve_fast  # noqa: E402
from lorapool.service.train.fast.lora import FusedLoraLinear4bit, apply_fused_lora  # noqa: E402
from lorapool.service.train.model import attach_lora, load_base_model  # noqa: E402


def _layer(dtype: torch.dtype, dropout: float, quant: str = "nf4", bias: bool = False):
    """A peft LoRA layer (r=8) over a freshly quantised 4-bit base, with a non-zero B."""
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(48, 80, bias=bias, compute_dtype=dtype, quant_type=quant)
    base.weight = bnb.nn.Params4bit(torch.randn(80, 48) * 0.1, requires_grad=False,
                                    quant_type=quant)
    if bias:
        base.bias = torch.nn.Parameter(torch.randn(80) * 0.1, requires_grad=False)
    base = base.to("cpu")
    base.support_avx512bf16_for_cpu = False  # see model._disable_cpu_weight_packing
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["x"])
    layer = PeftLinear4bit(base, "default", config=cfg, r=8, lora_alpha=16,
                           lora_dropout=dropout)
    # fp32 master weights, as get_peft_model's autocast_adapter_dtype leaves them in training.
    layer.lora_A.float()
    layer.lora_B.float()
    with torch.no_grad():  # peft starts B at zero, which would hide every B-path error
        layer.lora_B["default"].weight.normal_(0, 0.1)
    layer.train()
    return layer


def _run(layer, x: torch.Tensor, seed: int = 7):
    """Output and the gradients wrt x, A and B for a fixed upstream gradient."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask on both paths
    y = layer(x)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)
    y.backward(g)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return y.detach().float(), x.grad.float(), a.grad.clone(), b.grad.clone()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("quant,bias", [("nf4", False), ("fp4", True)])
def test_fused_matches_peft(dtype, tol, dropout, quant, bias):
    layer = _layer(dtype, dropout, quant, bias)
    x = torch.randn(2, 5, 48).to(dtype)
    ref = _run(layer, x)
    assert apply_fused_lora(layer) == 1
    assert isinstance(layer, FusedLoraLinear4bit)
    got = _run(layer, x)
    assert got[0].shape == ref[0].shape
    names = ["output", "dX", "dA", "dB"]
    for name, g, r in zip(names, got, ref):
        assert _rel(g, r) < tol, (name, _rel(g, r))
    # LoRA grads stay fp32 master-weight grads.
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32


def test_fused_forward_actually_runs_and_dropout_matters():
    """The fused node is in the graph, and dropout changes the result (so the mask test bites)."""
    layer = _layer(torch.float32, 0.5, "nf4")
    layer.__class__ = FusedLoraLinear4bit
    x = torch.randn(3, 48, requires_grad=True)
    torch.manual_seed(1)
    y1 = layer(x)
    assert type(y1.grad_fn).__name__ == "FusedLoraFunctionBackward"
    torch.manual_seed(2)
    y2 = layer(x)
    assert not torch.allclose(y1, y2)
    layer.eval()  # eval: dropout off, still fused, deterministic
    torch.manual_seed(1)
    e1 = layer(x)
    torch.manual_seed(2)
    assert torch.equal(e1, layer(x))


def test_falls_back_to_peft_when_disabled_or_merged():
    layer = _layer(torch.float32, 0.0)
    x = torch.randn(4, 48)
    base_out = layer.get_base_layer()(x)
    layer.__class__ = FusedLoraLinear4bit
    layer.enable_adapters(False)
    assert torch.allclose(layer(x), base_out)
    layer.enable_adapters(True)
    fused_out = layer(x)
    assert not torch.allclose(fused_out, base_out)
    layer.merge()  # merged: peft's own forward (the base now holds re-quantised W + s*BA)
    assert type(layer(x).grad_fn).__name__ != "FusedLoraFunctionBackward"


def _fast_spec(spec: TrainSpec, fast) -> TrainSpec:
    """`spec` with `fast` set, before (no field yet) and after tcore's spec.py gains it."""
    try:
        return TrainSpec(**{**spec.model_dump(), "fast": fast})
    except Exception:
        return spec.model_copy(update={"fast": fast})


def test_swapped_model_saves_a_plain_peft_adapter(tiny_model_dir, tmp_path):
    spec = TrainSpec(base_model=str(tiny_model_dir), device="cpu", quantization="nf4",
                     lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    spec = _fast_spec(spec, {"fused_lora": "on"})
    plan = resolve_fast(spec, torch.device("cpu"))
    assert plan.fused_lora, plan.reasons
    model, _ = load_base_model(spec)
    model = attach_lora(model, spec)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    names_before = {n: p.shape for n, p in model.named_parameters()}
    apply_fast_path(model, plan, spec, torch.device("cpu"))
    n_fused = sum(isinstance(m, FusedLoraLinear4bit) for m in model.modules())
    assert n_fused == 14  # 2 layers x 7 projections
    assert {n: p.shape for n, p in model.named_parameters()} == names_before
    with torch.no_grad():
        fused = model(input_ids=ids).logits
    assert torch.allclose(fused, ref, atol=1e-4, rtol=1e-4)

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base, _ = load_base_model(spec)
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert not any(isinstance(m, FusedLoraLinear4bit) for m in plain.modules())
    plain.eval()
    with torch.no_grad():
        again = plain(input_ids=ids).logits
    assert torch.allclose(again, ref, atol=1e-4, rtol=1e-4)


def test_lora_weight_casts_are_made_once_per_optimizer_step():
    from lorapool.service.train.fast.lora import lora_weight_in

    p = torch.nn.Parameter(torch.randn(4, 8))
    opt = torch.optim.SGD([p], lr=0.1)
    first = lora_weight_in(p, torch.bfloat16)
    assert lora_weight_in(p, torch.bfloat16) is first  # cached between steps
    assert torch.equal(first, p.detach().to(torch.bfloat16))
    p.grad = torch.ones_like(p)
    opt.step()  # the parameter changed: the next call casts the new values
    second = lora_weight_in(p, torch.bfloat16)
    assert second is not first and torch.equal(second, p.detach().to(torch.bfloat16))
    with torch.no_grad():
        p.add_(1.0)  # an in-place change outside an optimizer is seen through its version
    assert torch.equal(lora_weight_in(p, torch.bfloat16), p.detach().to(torch.bfloat16))


def test_a_freed_parameter_takes_its_cast_with_it():
    import gc

    from lorapool.service.train.fast import lora as fast_lora

    p = torch.nn.Parameter(torch.randn(4, 8))
    fast_lora.lora_weight_in(p, torch.bfloat16)
    pid = id(p)
    assert pid in fast_lora._CAST_CACHE
    del p
    gc.collect()
    assert pid not in fast_lora._CAST_CACHE and pid not in fast_lora._WATCHED


def test_a_freed_parameter_takes_every_stack_it_is_in_with_it():
    import gc

    from lorapool.service.train.fast import lora as fast_lora

    a, b = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(2, 8))
    stack = fast_lora.stacked_lora_weights([a, b], torch.bfloat16)
    assert torch.equal(stack, torch.cat([a, b]).detach().to(torch.bfloat16))
    assert fast_lora.stacked_lora_weights([a, b], torch.bfloat16) is stack  # cached
    ids = (id(a), id(b))
    assert ids in fast_lora._STACK_CACHE
    del a, stack
    gc.collect()
    assert ids not in fast_lora._STACK_CACHE  # b lives on, but the stack with a dead member goes
