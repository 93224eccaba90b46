"""fast/host_head.py: the streamed output-head loss equals the full and the chunked one (values
and gradients, every block layout), stays finite on large logits and computes no gradient it
is not asked for; HostHead gives nn.Linear's logits; the swap shares one table with a tied
input embedding and is refused where it cannot help."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lorapool.service.train.fast import host_head as hh
from lorapool.service.train.fast.embeddings import HostEmbedding
from lorapool.service.train.fast.host_head import (
    HostHead,
    default_block_rows,
    host_head_of,
    move_output_head_to_host,
    streamed_linear_cross_entropy,
)
from lorapool.service.train.loss import chunked_linear_cross_entropy
from lorapool.service.train.resolve import IGNORE_INDEX

V, H, N = 1000, 16, 37


def _case(dtype, n=N, h=H, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.randperm(n, generator=g)[: n // 3]] = IGNORE_INDEX  # a third carries no loss
    target[0] = v - 1  # in the last (partial, for block 96) block
    target[1] = 0
    return hidden, weight, target


def _full(hidden, weight, target, bias=None):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")


def _loss_and_grad(fn, hidden, *args, **kw):
    h = hidden.clone().requires_grad_(True)
    loss = fn(h, *args, **kw)
    loss.backward(torch.tensor(0.7))  # a non-unit incoming gradient, as loss / n_labels gives
    return loss.detach(), h.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-5, atol=1e-5)),
                                       (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))])
@pytest.mark.parametrize("block_rows", [96, 1, 999, 1000, 4096, None])
def test_streamed_equals_full_and_chunked(dtype, tol, block_rows):
    hidden, weight, target = _case(dtype)
    ref, ref_grad = _loss_and_grad(_full, hidden, weight, target)
    chunked, chunked_grad = _loss_and_grad(chunked_linear_cross_entropy, hidden, weight, target)
    got, grad = _loss_and_grad(streamed_linear_cross_entropy, hidden, weight, target,
                               block_rows=block_rows)
    assert got.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(got, chunked, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)
    torch.testing.assert_close(grad, chunked_grad, **tol)
    assert torch.all(grad[target == IGNORE_INDEX] == 0)
    assert grad[target != IGNORE_INDEX].abs().sum() > 0


def test_last_partial_block_target_counts():
    # Only one labelled row, its target in the last 40-row block of 96-row blocks: a pick that
    # missed the partial block would give lse instead of lse - logit.
    hidden, weight, target = _case(torch.float32)
    only = torch.full_like(target, IGNORE_INDEX)
    only[5] = V - 3
    ref, ref_grad = _loss_and_grad(_full, hidden, weight, only)
    got, grad = _loss_and_grad(streamed_linear_cross_entropy, hidden, weight, only,
                               block_rows=96)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    lse = torch.logsumexp(F.linear(hidden[5], weight), 0)
    assert abs(got.item() - lse.item()) > 1e-2  # the target logit was subtracted


def test_bias_is_added_per_block():
    hidden, weight, target = _case(torch.float32)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(3))
    ref, ref_grad = _loss_and_grad(_full, hidden, weight, target, bias)
    got, grad = _loss_and_grad(streamed_linear_cross_entropy, hidden, weight, target,
                               bias=bias, block_rows=96)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_all_rows_ignored_gives_zero_loss_and_zero_grad():
    hidden, weight, _ = _case(torch.float32)
    target = torch.full((N,), IGNORE_INDEX)
    got, grad = _loss_and_grad(streamed_linear_cross_entropy, hidden, weight, target,
                               block_rows=96)
    assert got.item() == 0.0
    assert grad is not None and torch.count_nonzero(grad) == 0


def test_other_ignore_index():
    hidden, weight, target = _case(torch.float32)
    target[target == IGNORE_INDEX] = 7  # a real vocabulary id used as the ignore label
    logits = F.linear(hidden, weight)
    ref = F.cross_entropy(logits, target, ignore_index=7, reduction="sum")
    got = streamed_linear_cross_entropy(hidden, weight, target, ignore_index=7, block_rows=96)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_numerically_stable_with_large_logits():
    hidden, weight, target = _case(torch.float32)
    hidden = hidden * 100
    assert F.linear(hidden, weight).abs().max() > 200  # exp() of these overflows fp32
    # The reference in fp64 throughout (the streamed loss upcasts each block to fp32).
    ref, ref_grad = _loss_and_grad(
        lambda h, w, t: F.cross_entropy(F.linear(h, w), t, ignore_index=IGNORE_INDEX,
                                        reduction="sum"),
        hidden.double(), weight.double(), target)
    got, grad = _loss_and_grad(streamed_linear_cross_entropy, hidden, weight, target,
                               block_rows=96)
    assert torch.isfinite(got) and torch.isfinite(grad).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-4)


def _count_linear(monkeypatch):
    calls = []
    real = F.linear

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(hh.F, "linear", counting)
    return calls


def test_gradient_pass_only_when_asked(monkeypatch):
    hidden, weight, target = _case(torch.float32)
    calls = _count_linear(monkeypatch)
    blocks = -(-V // 96)  # 11 blocks
    h = hidden.clone().requires_grad_(True)
    out = streamed_linear_cross_entropy(h, weight, target, block_rows=96)
    assert out.requires_grad and len(calls) == 2 * blocks  # both passes
    calls.clear()
    out = streamed_linear_cross_entropy(hidden, weight, target, block_rows=96)
    assert not out.requires_grad and len(calls) == blocks  # hidden needs no grad: one pass
    calls.clear()
    with torch.no_grad():
        out = streamed_linear_cross_entropy(h, weight, target, block_rows=96)
    assert not out.requires_grad and len(calls) == blocks
    ref = _full(hidden, weight, target)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_refuses_a_trainable_weight_or_bias_and_bad_targets():
    hidden, weight, target = _case(torch.float32)
    with pytest.raises(ValueError, match="no gradient for the weight"):
        streamed_linear_cross_entropy(hidden, weight.clone().requires_grad_(True), target)
    with pytest.raises(ValueError, match="bias"):
        streamed_linear_cross_entropy(hidden, weight, target,
                                      bias=torch.zeros(V, requires_grad=True))
    bad = target.clone()
    bad[2] = V
    with pytest.raises(ValueError, match="outside the vocabulary"):
        streamed_linear_cross_entropy(hidden, weight, bad)


def test_default_block_rule():
    # 2048 tokens, Llama-3 vocab, H=2048 bf16: logits allow 8192 rows, the 16 MiB weight
    # block 4096.
    assert default_block_rows(2048, 128256, 2048, 2) == 4096
    # 8192 tokens: the 64 MiB logits cap (2048 rows) is the tighter one.
    assert default_block_rows(8192, 128256, 2048, 2) == 2048
    assert default_block_rows(10**6, 128256, 2048, 2) == 512  # the floor wins
    assert default_block_rows(16, 500, 64, 4) == 500  # never more than the vocabulary


def test_the_memory_estimate_uses_the_same_block_rule():
    from lorapool.service.train.memory import host_head_block_rows

    for n, v, h, e in [(2048, 128256, 2048, 2), (8192, 128256, 3072, 2), (512, 128256, 4096, 2),
                       (10**6, 128256, 2048, 2), (16, 500, 64, 4), (32768, 32000, 4096, 4)]:
        assert host_head_block_rows(n, v, h, e) == default_block_rows(n, v, h, e)


# -- HostHead and the swap ------------------------------------------------------------------------


def _linear(bias: bool) -> torch.nn.Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(H, V, bias=bias)
    lin.requires_grad_(False)
    return lin


@pytest.mark.parametrize("bias", [False, True])
def test_host_head_forward_equals_linear(bias):
    lin = _linear(bias)
    head = HostHead(lin, pin=False, block_rows=96)
    x = torch.randn(2, 5, H)
    torch.testing.assert_close(head(x), lin(x), rtol=1e-6, atol=1e-6)
    # Gradient wrt the hidden states flows through the streamed blocks as through the Linear.
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w = torch.randn(2, 5, V)
    (head(xa) * w).sum().backward()
    (lin(xb) * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    # The streamed loss through the module equals the full one.
    target = torch.randint(0, V, (2, 5))
    target[0, :2] = IGNORE_INDEX
    ref = F.cross_entropy(lin(x).reshape(-1, V), target.reshape(-1), reduction="sum")
    torch.testing.assert_close(head.loss_sum(x, target), ref, rtol=1e-5, atol=1e-5)
    assert "on host" in repr(head)


def test_host_head_stays_on_host_through_model_to():
    head = HostHead(_linear(True), pin=False)
    model = torch.nn.Sequential(torch.nn.Linear(H, H), head)
    model.to(torch.float64)
    assert model[0].weight.dtype == torch.float64  # the rest of the model did move
    assert head.weight.dtype == torch.float32 and head.weight.device.type == "cpu"
    assert head.bias.dtype == torch.float32
    assert list(head.parameters()) == [] and "weight" not in model.state_dict().keys()


def test_host_head_refuses_a_trained_head_and_a_mismatched_table():
    lin = _linear(False)
    lin.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        HostHead(lin, pin=False)
    with pytest.raises(ValueError, match="host_weight"):
        HostHead(_linear(False), pin=False, host_weight=torch.zeros(V, H + 1))


def _llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def _ids(vocab: int = 300):
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(1))


def test_swap_is_off_on_the_cpu_and_for_a_trained_head():
    model = _llama(tie=False)
    head = model.get_output_embeddings()
    msg = move_output_head_to_host(model)
    assert msg.startswith("off:") and "not on CUDA" in msg
    assert model.get_output_embeddings() is head and host_head_of(model) is None
    head.weight.requires_grad_(True)
    assert move_output_head_to_host(model, allow_cpu=True) == "off: the output head is trained"
    assert model.get_output_embeddings() is head


def test_swap_untied_keeps_logits_and_leaves_the_embedding():
    model = _llama(tie=False)
    ids = _ids()
    ref = model(ids).logits
    emb = model.get_input_embeddings()
    msg = move_output_head_to_host(model, allow_cpu=True, block_rows=64)
    assert msg.startswith("output head (") and "shared" not in msg
    head = host_head_of(model)
    assert isinstance(head, HostHead) and model.get_input_embeddings() is emb
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-6, atol=1e-6)
    assert move_output_head_to_host(model, allow_cpu=True).startswith("off: the output head "
                                                                      "already")
    # An untied input embedding already on the host is not taken for the head's table.
    model2 = _llama(tie=False)
    model2.set_input_embeddings(HostEmbedding(model2.get_input_embeddings(), torch.device("cpu")))
    assert "shared" not in move_output_head_to_host(model2, allow_cpu=True)
    assert host_head_of(model2).weight is not model2.get_input_embeddings().weight


def test_swap_frees_the_old_weight_even_where_something_still_holds_it(monkeypatch):
    """The head's old weight loses its storage once the HostHead holds a copy and no module uses
    it, whoever still holds the Parameter (on a GPU the copy is the move to pinned host memory;
    here a clone stands in for it, as the CPU table would otherwise be the same tensor)."""
    from lorapool.service.train.fast import host_head as hh

    monkeypatch.setattr(hh, "_to_host", lambda t, pin: t.detach().clone())
    model = _llama(tie=False)
    ids = _ids()
    ref = model(ids).logits
    held = model.get_output_embeddings().weight  # a stray reference, as the H100 run had
    move_output_head_to_host(model, allow_cpu=True, block_rows=64)
    assert held.numel() == 0
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-6, atol=1e-6)
    # A weight some module still uses keeps its storage (a head tied to a table that stays).
    model = _llama(tie=False)
    emb = model.get_input_embeddings()
    emb.weight = model.get_output_embeddings().weight  # tied, but not as _shared_table sees it
    hh._release(model, emb.weight, emb.weight.detach().clone())
    assert emb.weight.numel() > 0


def test_swap_tied_moves_the_embedding_and_shares_one_table():
    model = _llama(tie=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = _ids()
    ref = model(ids).logits
    msg = move_output_head_to_host(model, allow_cpu=True, block_rows=64)
    assert msg.endswith("shared with the tied input embedding")
    emb, head = model.get_input_embeddings(), host_head_of(model)
    assert isinstance(emb, HostEmbedding) and isinstance(head, HostHead)
    assert head.weight is emb.weight and head.weight.data_ptr() == emb.weight.data_ptr()
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-6, atol=1e-6)


def test_swap_tied_reuses_an_embedding_already_on_the_host():
    model = _llama(tie=True)
    ids = _ids()
    ref = model(ids).logits
    # The host embedding's table is its own copy (as on CUDA): identity no longer shows the tie.
    host_emb = HostEmbedding(copy.deepcopy(model.get_input_embeddings()), torch.device("cpu"))
    model.set_input_embeddings(host_emb)
    assert host_emb.weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    msg = move_output_head_to_host(model, allow_cpu=True)
    assert "shared with the tied input embedding" in msg
    assert model.get_input_embeddings() is host_emb
    assert host_head_of(model).weight.data_ptr() == host_emb.weight.data_ptr()
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-6, atol=1e-6)


def test_host_head_of_sees_through_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(tie=False), LoraConfig(r=4, target_modules=["q_proj"]))
    assert host_head_of(model) is None
    assert move_output_head_to_host(model, allow_cpu=True).startswith("output head (")
    assert isinstance(host_head_of(model), HostHead)
    assert host_head_of(model) is model.get_base_model().lm_head


# -- the trainer on a GPU -----------------------------------------------------------------------


def _run(model_dir, data, out, host_head: str):
    """A short bf16 run on the GPU; (per-step losses, the trainer, its plan's host_head)."""
    from lorapool.service.train import LoraSpec, TrainSpec
    from lorapool.service.train.loop import Trainer

    losses: list[float] = []
    spec = TrainSpec(base_model=str(model_dir), device="cuda", compute_dtype="bf16",
                     max_seq_len=64, batch_size=4, micro_batch_size=2, learning_rate=5e-3,
                     lora=LoraSpec(r=8, alpha=16), max_steps=5, seed=3,
                     fast={"host_head": host_head})
    t = Trainer(spec, str(data), out,
                on_event=lambda e: losses.append(e.loss) if e.type == "step" else None)
    t.run()
    return losses, t


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tied", [False, True])
def test_training_with_the_head_on_the_host_is_training(tiny_model_dir, toy_data, tmp_path,
                                                        tied) -> None:
    """The real trainer with host_head "on" (loaded and quantised on the CPU, tables kept in
    pinned host memory, streamed loss with side-stream copies) and "off" (loaded on the GPU):
    the same per-step losses and adapters to bf16 tolerance; the head (and a table tied to it)
    never on the GPU."""
    from safetensors.torch import load_file

    from lorapool.service.train.tiny import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True) if tied \
        else tiny_model_dir
    data = toy_data.write_jsonl(tmp_path / "train.jsonl", toy_data.chat_records(24))
    off, _ = _run(model, data, tmp_path / "off", "off")
    on, t = _run(model, data, tmp_path / "on", "on")
    assert t.plan.host_head and not t.plan.cuda_graphs, t.plan.reasons
    head = hh.host_head_of(t.model)
    assert head is not None and head.weight.device.type == "cpu" and head.weight.is_pinned()
    if tied:
        emb = t.model.get_base_model().get_input_embeddings()
        assert isinstance(emb, HostEmbedding) and emb.weight.data_ptr() == head.weight.data_ptr()
    assert len(on) == len(off) == 5
    for a, b in zip(on, off):
        assert abs(a - b) <= 2e-2 * abs(b), (on, off)
    a = load_file(str(tmp_path / "on" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "off" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        rel = float((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12))
        assert rel < 0.05, (k, rel)


@pytest.mark.parametrize("tied", [False, True])
def test_tables_kept_on_the_host_at_load(tmp_path, tied) -> None:
    """keep_tables_on_host on a model loaded (and quantised) on the CPU, as the trainer's
    staged load does before the rest moves to the GPU: both tables become host modules (one
    table when tied), a following module move leaves them be, and the logits are unchanged."""
    from lorapool.service.train import TrainSpec
    from lorapool.service.train.model import load_base_model
    from lorapool.service.train.tiny import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "m", tie_word_embeddings=tied)
    spec = TrainSpec(base_model=str(folder), device="cpu", compute_dtype="fp32")
    # The trainer's staged load, end to end (on a GPU the move after the swap goes to the card).
    staged, _ = load_base_model(spec, "cpu", keep_on_host=lambda m: hh.keep_tables_on_host(
        m, torch.device("cpu")))
    assert isinstance(staged.get_input_embeddings(), HostEmbedding)
    assert hh.host_head_of(staged) is not None
    model, _ = load_base_model(spec, "cpu")
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    ids = _ids(vocab=model.config.vocab_size)
    with torch.no_grad():
        ref = model(ids).logits
    msg = hh.keep_tables_on_host(model, torch.device("cpu"))
    assert "input embedding" in msg and "output head" in msg
    assert ("the same table" in msg) == tied
    emb, head = model.get_input_embeddings(), hh.host_head_of(model)
    assert isinstance(emb, HostEmbedding) and isinstance(head, HostHead)
    assert (emb.weight.data_ptr() == head.weight.data_ptr()) == tied
    torch.nn.Module.to(model, torch.float64)  # a move or cast of the rest leaves them alone
    assert emb.weight.dtype == head.weight.dtype == torch.float32
    torch.nn.Module.to(model, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(staged(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert hh.keep_tables_on_host(model, torch.device("cpu")).startswith("nothing")


@pytest.mark.parametrize("tied", [False, True])
def test_a_staged_model_takes_lora_and_trains(tmp_path, tied) -> None:
    """What the trainer does next with a staged model: peft wraps it (the host tables are no
    parameters: "all-linear" must not find them, nothing may re-tie them), checkpointing is on,
    and a step's loss through the streamed head has the same value and LoRA gradients as the
    same model with its tables in place; the adapter saves as a plain PEFT folder."""
    from lorapool.service.train import LoraSpec, TrainSpec
    from lorapool.service.train.loss import token_loss_sum
    from lorapool.service.train.model import attach_lora, load_base_model
    from lorapool.service.train.tiny import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "m", tie_word_embeddings=tied)
    spec = TrainSpec(base_model=str(folder), device="cpu", compute_dtype="fp32",
                     lora=LoraSpec(r=4, alpha=8), seed=0)
    ids = _ids(vocab=100)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    results = []
    for staged in (False, True):
        keep = (lambda m: hh.keep_tables_on_host(m, torch.device("cpu"))) if staged else None
        base, _ = load_base_model(spec, "cpu", keep_on_host=keep)
        torch.manual_seed(0)
        model = attach_lora(base, spec)
        assert (hh.host_head_of(model) is not None) == staged
        with torch.no_grad():  # non-zero B, so every LoRA weight gets a gradient
            for name, prm in model.named_parameters():
                if "lora_B" in name:
                    prm.copy_(torch.full_like(prm, 0.01))
        loss, n = token_loss_sum(model, batch, chunked=True)
        loss.backward()
        grads = {k: prm.grad.clone() for k, prm in model.named_parameters() if prm.grad is not None}
        assert grads and all("lora_" in k for k in grads)
        results.append((float(loss), n, grads))
        if staged:
            model.save_pretrained(tmp_path / "adapter")
            assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    (ref, n_ref, g_ref), (got, n_got, g_got) = results
    assert n_ref == n_got and abs(got - ref) <= 1e-5 * abs(ref)
    assert g_ref.keys() == g_got.keys()
    for k in g_ref:
        torch.testing.assert_close(g_got[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=k)
