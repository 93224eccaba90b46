"""A model split layer-wise over several devices (train/model_split.py): the device map's layer
ranges, the boundary hooks, and training end to end — over two "cpu" devices here (the same
loader, map, hooks and loop; the moves are no-ops), over two CUDA GPUs in the gpu test."""

from __future__ import annotations

import json

import pytest
import torch

from lorapool.service.train import ModelLoadError, SplitSpec, TrainSpec, train
from lorapool.service.train.model_split import (
    ResolvedSplit,
    _Mover,
    map_for_model,
    resolve_split,
    split_device_map,
)
from lorapool.service.train.tiny import make_random_llama


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """A tiny random Llama with 4 decoder layers (2 per device), weights written."""
    return make_random_llama(tmp_path_factory.mktemp("split") / "m", "tiny",
                             num_hidden_layers=4)


def _empty(folder, tied=False):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    config.tie_word_embeddings = tied
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    if tied:
        model.tie_weights()
    return model


def _split(*layers: tuple[int, int], devices=("cuda:0", "cuda:1")) -> ResolvedSplit:
    return ResolvedSplit(tuple(torch.device(d) for d in devices), tuple(layers))


def test_device_map_puts_each_layer_range_on_its_device(four_layers):
    split = _split((0, 3), (3, 4))
    dmap = map_for_model(_empty(four_layers), split, input_embedding="cpu", head="cuda:1")
    assert [dmap[f"model.layers.{i}"] for i in range(4)] == [0, 0, 0, 1]
    assert dmap["model.embed_tokens"] == "cpu"  # the fast path's host table
    assert dmap["model.norm"] == 1  # the final norm with the last layers
    assert dmap["model.rotary_emb"] == 0  # RoPE computes on the embeddings' output
    assert dmap["lm_head"] == 1
    # Nothing maps a whole subtree (no "" or "model" entry: the tables would go there first).
    assert "" not in dmap and "model" not in dmap and "model.layers" not in dmap

    three = ResolvedSplit(tuple(torch.device(f"cuda:{i}") for i in range(3)),
                          ((0, 1), (1, 2), (2, 4)))
    dmap = map_for_model(_empty(four_layers), three, input_embedding="cuda:0", head="cpu")
    assert [dmap[f"model.layers.{i}"] for i in range(4)] == [0, 1, 2, 2]
    assert dmap["model.embed_tokens"] == 0 and dmap["lm_head"] == "cpu"
    assert dmap["model.norm"] == 2


def test_a_tied_table_follows_the_head(tmp_path):
    folder = make_random_llama(tmp_path / "tied", "tiny", num_hidden_layers=4,
                               tie_word_embeddings=True)
    spec = TrainSpec(base_model=str(folder), device="cpu")
    dmap = split_device_map(folder, spec, _split((0, 2), (2, 4)), input_embedding="cpu",
                            head="cuda:1")
    assert dmap["model.embed_tokens"] == dmap["lm_head"] == 1


def test_resolve_split_checks_what_it_is_given(four_layers):
    spec = TrainSpec(base_model=str(four_layers), device="cpu")
    even = resolve_split(SplitSpec(devices=["cpu", "cpu", "cpu"]), spec)
    assert even.layers == ((0, 2), (2, 3), (3, 4))
    given = resolve_split(SplitSpec(devices=["cpu", "cpu"], layers=[1, 3]), spec)
    assert given.layers == ((0, 1), (1, 4))
    with pytest.raises(ModelLoadError, match="add up to 5"):
        resolve_split(SplitSpec(devices=["cpu", "cpu"], layers=[2, 3]), spec)
    with pytest.raises(ModelLoadError, match="4 decoder layers over 5 devices"):
        resolve_split(SplitSpec(devices=["cpu"] * 5), spec)
    with pytest.raises(ValueError, match="2 entries for 3 devices"):
        SplitSpec(devices=["cpu"] * 3, layers=[2, 2])


def test_mover_moves_shared_inputs_once_and_hidden_states_through_autograd():
    mover = _Mover()
    meta = torch.device("meta")
    cos = torch.randn(4, 8)
    first = mover((cos, {"position_ids": torch.arange(4)}), meta)
    again = mover((cos,), meta)
    assert first[0].device.type == "meta" and again[0] is first[0]  # one copy per forward
    assert first[1]["position_ids"].device.type == "meta"
    hidden = torch.randn(4, 8, requires_grad=True)
    moved = mover(hidden, meta)
    assert moved.grad_fn is not None and mover(hidden, meta) is not moved
    key = (id(cos), meta)
    assert key in mover._memo
    del cos, first, again
    assert key not in mover._memo  # the copy goes with its original
    assert mover(None, meta) is None and mover("x", meta) == "x"


def _data(tmp_path, toy_data):
    return toy_data.write_jsonl(tmp_path / "train.jsonl", toy_data.chat_records(16))


def test_split_run_trains_like_the_unsplit_one(tmp_path, four_layers, toy_data):
    """Over two "cpu" devices: the split loader (explicit device map, accelerate's hooks off),
    the boundary hooks and the loop give the loss and adapter of the one-device run, and the
    adapter is a plain PEFT folder whose metadata says how the run was split."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = _data(tmp_path, toy_data)
    spec = TrainSpec(base_model=str(four_layers), device="cpu", max_steps=3, batch_size=4,
                     micro_batch_size=2, max_seq_len=64, learning_rate=1e-2)
    events = []
    one = train(spec, data, tmp_path / "one", cache_dir=tmp_path / "cache")
    two = train(spec, data, tmp_path / "two", cache_dir=tmp_path / "cache",
                split=SplitSpec(devices=["cpu", "cpu"], layers=[3, 1]), on_event=events.append)
    assert two.status == "completed"
    assert two.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], rel=1e-6)
    a = load_file(one.adapter_dir / "adapter_model.safetensors")
    b = load_file(two.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    meta = json.loads((two.adapter_dir / "lorapool.json").read_text())
    assert meta["split"]["layers"] == [[0, 3], [3, 4]]
    assert meta["split"]["devices"] == ["cpu", "cpu"]
    assert "split" not in json.loads((one.adapter_dir / "lorapool.json").read_text())
    said = [e for e in events if e.type == "status" and "split" in (e.data or {})]
    assert said and "layers 0-2 on cpu; layers 3-3 on cpu" in said[0].message
    assert two.metrics["split_peak_memory_bytes"] == [None, None]
    # A plain PEFT folder.
    base = AutoModelForCausalLM.from_pretrained(four_layers)
    PeftModel.from_pretrained(base, str(two.adapter_dir))


def test_split_model_runs_its_hooks(tmp_path, four_layers):
    from lorapool.service.train.loss import token_loss_sum
    from lorapool.service.train.model import build_model

    spec = TrainSpec(base_model=str(four_layers), device="cpu", max_seq_len=32)
    built = build_model(spec, torch.device("cpu"), cache_dir=tmp_path / "c",
                        split=SplitSpec(devices=["cpu", "cpu"]))
    lm = built.model.get_base_model()
    assert built.split.layers == ((0, 2), (2, 4))
    assert lm.hf_device_map["model.layers.3"] == "cpu"
    # Every decoder layer and the final norm: a pre-hook and a hook each.
    assert len(lm._lorapool_split_hooks) == 2 * (4 + 1)
    assert not any(hasattr(m, "_hf_hook") for m in lm.modules())  # accelerate's are gone
    calls = []
    lm.model.layers[2].register_forward_pre_hook(lambda m, a: calls.append(a[0].device))
    ids = torch.randint(10, 60, (1, 12))
    loss, n = token_loss_sum(built.model, {"input_ids": ids, "labels": ids,
                                           "attention_mask": torch.ones_like(ids)}, chunked=True)
    assert n == 11 and torch.isfinite(loss) and calls == [torch.device("cpu")]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_split_over_two_gpus_matches_one_gpu(tmp_path, four_layers):
    """On cuda:0 + cuda:1 (layers 0-1 and 2-3, head and loss on cuda:1): the same loss and the
    same LoRA gradients as the whole model on cuda:0, with the fast path as it runs there."""
    from lorapool.service.train.loss import token_loss_sum
    from lorapool.service.train.model import build_model, trainable_parameters

    spec = TrainSpec(base_model=str(four_layers), device="cuda", max_seq_len=64)
    torch.manual_seed(0)
    ids = torch.randint(10, 60, (2, 48))
    labels = ids.clone()
    labels[:, :5] = -100

    def run(split):
        torch.manual_seed(0)  # the same LoRA init in both builds
        built = build_model(spec, torch.device("cuda", 0), cache_dir=tmp_path / "c",
                            split=split)
        model = built.model
        model.train()
        batch = {"input_ids": ids.to("cuda:0"), "labels": labels.to("cuda:0")}
        if built.plan.padding_free:
            batch["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids).to("cuda:0")
        else:
            batch["attention_mask"] = torch.ones_like(ids).to("cuda:0")
        loss, _ = token_loss_sum(model, batch, chunked=built.chunked_loss)
        loss.backward()
        grads = {n: p.grad.detach().float().cpu() for n, p in
                 trainable_parameters(model).items()}
        devices = {n: p.device for n, p in trainable_parameters(model).items()}
        return float(loss), grads, devices, built

    loss1, grads1, _, _ = run(None)
    loss2, grads2, devices2, built2 = run(SplitSpec(devices=["cuda:0", "cuda:1"], layers=[2, 2]))
    assert not built2.plan.cuda_graphs and "one device's stream" in \
        built2.plan.reasons["cuda_graphs"]
    assert {d.index for n, d in devices2.items() if ".layers.3." in n} == {1}
    assert {d.index for n, d in devices2.items() if ".layers.0." in n} == {0}
    assert loss2 == pytest.approx(loss1, rel=1e-3)
    assert grads1.keys() == grads2.keys()
    for n in grads1:
        torch.testing.assert_close(grads2[n], grads1[n], rtol=2e-2, atol=1e-4, msg=n)
