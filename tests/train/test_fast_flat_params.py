"""fast/flat_params.py: the packed optimizer steps as the per-tensor one, and checkpoints keep
the per-tensor layout (so runs resume across the switch), on the CPU with bitsandbytes' real
8-bit AdamW."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from lorapool.service.train import LoraSpec, TrainError, TrainSpec, train
from lorapool.service.train.fast.flat_params import BLOCK, FlatParams

# LoRA-like shapes, every one at least bitsandbytes' 4,096 elements (its 8-bit minimum), one
# of them not a multiple of the 256-element block.
SHAPES = [(16, 2048), (2048, 16), (16, 512), (512, 16), (16, 300), (300, 16)]
WRAPPED = "__bnb_optimizer_quant_state__"


def _params(shapes=SHAPES, seed: int = 1) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]


def _grads(step: int, shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in shapes]


def _step_per_tensor(opt, params, step: int, shapes=SHAPES) -> None:
    for p, g in zip(params, _grads(step, shapes)):
        p.grad = g.clone()
    opt.step()


def _step_flat(opt, flat: FlatParams, step: int, shapes=SHAPES) -> None:
    flat.zero_grad()
    for p, g in zip(flat.members, _grads(step, shapes)):
        p.grad.add_(g)  # as autograd accumulates: into the view, in place
    opt.step()


def _assert_same(a, b) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x.detach(), y.detach())


@pytest.mark.parametrize("make", [
    lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2, weight_decay=0.01),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, foreach=False),
], ids=["adamw_8bit", "adamw"])
def test_the_flat_step_is_the_per_tensor_step(make):
    ref, packed = _params(), _params()
    flat = FlatParams(packed)
    ref_opt, flat_opt = make(ref), make(flat.params)
    assert len(flat.params) == 1 and flat.params[0].numel() % BLOCK == 0
    for step in range(4):
        _step_per_tensor(ref_opt, ref, step)
        _step_flat(flat_opt, flat, step)
    _assert_same(ref, packed)
    assert flat.intact()


def test_members_keep_their_identity_and_autograd_fills_the_flat_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    params = list(model.parameters())
    flat = FlatParams(params)
    assert list(model.parameters()) == params  # the same Parameter objects, now views
    x = torch.randn(5, 8)
    for _ in range(2):  # two micro-batches accumulate
        model(x).square().sum().backward()
        twin(x).square().sum().backward()
    assert flat.intact()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    # The gradient buffer is what the members' grads are: zeroing it zeroes them.
    flat.zero_grad()
    assert all(not p.grad.any() for p in model.parameters())
    # A module that dropped a grad breaks the packing, and intact() says so.
    params[0].grad = None
    assert not flat.intact()


def test_two_dtypes_get_two_buffers_in_first_seen_order():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2).double()),
              torch.nn.Parameter(torch.ones(4))]
    flat = FlatParams(params)
    assert [p.dtype for p in flat.params] == [torch.float32, torch.float64]
    assert [p.numel() for p in flat.params] == [2 * BLOCK, BLOCK]


def test_mixed_dtypes_checkpoint_in_the_tensors_own_order():
    # Packed per dtype, the buffers hold tensors 0 and 2, then 1: the checkpoint numbers them
    # as the optimizer over the tensors themselves would.
    def make():
        g = torch.Generator().manual_seed(5)
        return [torch.nn.Parameter(torch.randn(16, 300, generator=g)),
                torch.nn.Parameter(torch.randn(16, 280, generator=g).double()),
                torch.nn.Parameter(torch.randn(16, 260, generator=g))]
    ref, packed = make(), make()
    flat = FlatParams(packed)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    flat_opt = torch.optim.AdamW(flat.params, lr=1e-2, foreach=False)
    shapes = [tuple(p.shape) for p in ref]
    for step in range(2):
        for p, g in zip(ref, _grads(step, shapes)):
            p.grad = g.to(p.dtype)
        ref_opt.step()
        flat.zero_grad()
        for p, g in zip(packed, _grads(step, shapes)):
            p.grad.add_(g.to(p.dtype))
        flat_opt.step()
    saved, ours = ref_opt.state_dict(), flat.unpack_state(flat_opt.state_dict())
    assert list(ours["state"]) == [0, 1, 2]
    for i in range(3):
        assert ours["state"][i]["exp_avg"].dtype == ref[i].dtype
        torch.testing.assert_close(ours["state"][i]["exp_avg"], saved["state"][i]["exp_avg"])
    repacked = flat.pack_state(saved)
    for k in range(2):
        torch.testing.assert_close(repacked["state"][k]["exp_avg"],
                                   flat_opt.state_dict()["state"][k]["exp_avg"])


def test_checkpoint_state_is_the_per_tensor_state_and_resumes_either_way():
    ref, packed = _params(), _params()
    flat = FlatParams(packed)
    ref_opt = bnb.optim.AdamW8bit(ref, lr=1e-2)
    flat_opt = bnb.optim.AdamW8bit(flat.params, lr=1e-2)
    for step in range(3):
        _step_per_tensor(ref_opt, ref, step)
        _step_flat(flat_opt, flat, step)
    saved_ref, saved_flat = ref_opt.state_dict(), flat.unpack_state(flat_opt.state_dict())
    assert saved_flat["param_groups"][0]["params"] == saved_ref["param_groups"][0]["params"]
    for i in saved_ref["state"]:
        for key in ("state1", "state2", "absmax1", "absmax2"):
            assert torch.equal(saved_ref["state"][i][WRAPPED][key], saved_flat["state"][i][WRAPPED][key])
        assert saved_ref["state"][i]["step"] == saved_flat["state"][i]["step"]

    # A per-tensor checkpoint resumed packed, a packed one resumed per tensor.
    resumed_flat = FlatParams([torch.nn.Parameter(p.detach().clone()) for p in ref])
    opt_a = bnb.optim.AdamW8bit(resumed_flat.params, lr=1e-2)
    opt_a.load_state_dict(resumed_flat.pack_state(saved_ref))
    per_tensor = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_b = bnb.optim.AdamW8bit(per_tensor, lr=1e-2)
    opt_b.load_state_dict(saved_flat)
    for step in range(3, 6):
        _step_per_tensor(ref_opt, ref, step)
        _step_flat(opt_a, resumed_flat, step)
        _step_per_tensor(opt_b, per_tensor, step)
    _assert_same(ref, resumed_flat.members)
    _assert_same(ref, per_tensor)


def test_small_tensors_32_bit_state_joins_8_bit_state():
    # bitsandbytes keeps 32-bit moments for tensors under 4,096 elements; an old per-tensor
    # checkpoint mixes both kinds, and packing quantises the 32-bit ones.
    shapes = [(16, 64), (64, 16), (16, 2048), (2048, 16)]
    ref = _params(shapes)
    ref_opt = bnb.optim.AdamW8bit(ref, lr=1e-2)
    _step_per_tensor(ref_opt, ref, 0, shapes)
    saved = ref_opt.state_dict()
    assert [saved["state"][i][WRAPPED]["state1"].dtype for i in range(4)] == \
        [torch.float32, torch.float32, torch.uint8, torch.uint8]
    flat = FlatParams([torch.nn.Parameter(p.detach().clone()) for p in ref])
    opt = bnb.optim.AdamW8bit(flat.params, lr=1e-2)
    opt.load_state_dict(flat.pack_state(saved))
    _step_per_tensor(ref_opt, ref, 1, shapes)
    _step_flat(opt, flat, 1, shapes)
    for x, y, (rows, cols) in zip(ref, flat.members, shapes):
        if rows * cols >= 4096:
            assert torch.equal(x.detach(), y.detach())
        else:  # 8-bit moments instead of 32-bit: a step of lr 1e-2 moves by ~1e-2
            torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=2e-3)


def test_a_state_for_other_tensors_is_refused_with_the_counts():
    flat = FlatParams(_params())
    opt = bnb.optim.AdamW8bit(_params()[:2], lr=1e-2)
    with pytest.raises(ValueError, match="2 tensors, this model trains 6"):
        flat.pack_state(opt.state_dict())


# -- in the trainer (tests/train/test_loop.py's tiny 4-bit Llama) --------------------------------


def _spec(model_dir, flat: str, **kw) -> TrainSpec:
    base = {"base_model": str(model_dir), "base_model_id": "tiny-llama", "device": "cpu",
            "max_seq_len": 64, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 5e-3,
            "warmup_ratio": 0.1, "lora": LoraSpec(r=8, alpha=16), "max_steps": 6, "seed": 7,
            "fast": {"flat_optimizer": flat}}
    base.update(kw)
    return TrainSpec(**base)


@pytest.fixture
def data(tmp_path, toy_data):
    return toy_data.write_jsonl(tmp_path / "train.jsonl", toy_data.chat_records(32))


def test_the_trainer_packs_when_asked_and_trains_the_same(tiny_model_dir, data, tmp_path,
                                                           same_adapter):
    # fp32 AdamW: the same moments packed or not (the tiny model's tensors are under
    # bitsandbytes' 4,096-element minimum, so 8-bit state would differ by design).
    events = []
    on = train(_spec(tiny_model_dir, "on", optimizer="adamw"), data, tmp_path / "on",
               cache_dir=tmp_path / "cache", on_event=events.append)
    off = train(_spec(tiny_model_dir, "off", optimizer="adamw"), data, tmp_path / "off",
                cache_dir=tmp_path / "cache")
    plan = next(e.data["fast"] for e in events if e.data and "fast" in e.data)
    assert plan["flat_optimizer"] is True
    assert on.status == off.status == "completed"
    same_adapter(on.adapter_dir, off.adapter_dir)


@pytest.mark.parametrize("first,then", [("on", "off"), ("off", "on")])
def test_a_checkpoint_resumes_across_the_switch(tiny_model_dir, data, tmp_path, first, then,
                                                same_adapter):
    spec = _spec(tiny_model_dir, first, max_steps=5, checkpoint_every=1)
    full = train(spec, data, tmp_path / "full", cache_dir=tmp_path / "cache")
    calls = {"n": 0}

    def stop_after_2() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    part = train(spec, data, tmp_path / "part", cache_dir=tmp_path / "cache",
                 should_stop=stop_after_2)
    assert part.status == "stopped" and part.step == 2
    resumed = train(_spec(tiny_model_dir, then, max_steps=5, checkpoint_every=1), data,
                    tmp_path / "resumed", cache_dir=tmp_path / "cache",
                    resume_from=part.last_checkpoint)
    assert resumed.status == "completed" and resumed.step == 5
    same_adapter(resumed.adapter_dir, full.adapter_dir)


def test_a_checkpoint_of_another_model_is_refused_by_name(tiny_model_dir, data, tmp_path):
    # Adapted on fewer modules: every adapter weight it has fits, its optimizer state does not.
    fewer = _spec(tiny_model_dir, "on", max_steps=3,
                  lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    part = train(fewer, data, tmp_path / "part", cache_dir=tmp_path / "cache",
                 should_stop=lambda: True)
    other = _spec(tiny_model_dir, "on", max_steps=3)
    with pytest.raises(TrainError, match="tensors, this model trains") as err:
        train(other, data, tmp_path / "x", cache_dir=tmp_path / "cache",
              resume_from=part.last_checkpoint)
    assert err.value.code == "checkpoint_mismatch"


def test_the_trainer_stops_when_a_packed_tensor_is_cut_loose(tiny_model_dir, data, tmp_path):
    # Something dropped a member's grad: autograd then gives it a tensor of its own, which the
    # optimizer (stepping the flat buffer) would never read. The run must say so, not go on.
    from lorapool.service.train.loop import Trainer

    t = Trainer(_spec(tiny_model_dir, "on", max_steps=3), str(data), tmp_path / "out",
                cache_dir=tmp_path / "cache")
    t._setup()
    t.params[0].grad = None
    with pytest.raises(TrainError, match="left the optimizer's packed buffer after the first "
                                         "step") as err:
        t.run()
    assert err.value.code == "flat_optimizer_broken"


def test_saving_hands_peft_host_copies_not_the_packed_storage(tiny_model_dir, data, tmp_path,
                                                             monkeypatch):
    # The packed tensors share one storage, and peft clones aliased tensors where they are
    # (on a card: a copy of the whole adapter at every checkpoint). The trainer hands it
    # separate host copies instead, and the file holds the trained values.
    from lorapool.service.train.loop import Trainer

    t = Trainer(_spec(tiny_model_dir, "on", max_steps=2), str(data), tmp_path / "out",
                cache_dir=tmp_path / "cache")
    t._setup()
    packed = {p.untyped_storage().data_ptr() for p in t.params}
    assert len(packed) == 1
    handed: dict = {}
    save = type(t.model).save_pretrained

    def spy(model, folder, **kw):
        handed.update(kw["state_dict"])
        return save(model, folder, **kw)

    monkeypatch.setattr(type(t.model), "save_pretrained", spy)
    t.run()
    trained = dict(t.model.named_parameters())
    adapter = {k: v for k, v in handed.items() if k in trained and trained[k].requires_grad}
    assert adapter and all(v.device.type == "cpu" for v in adapter.values())
    storages = [v.untyped_storage().data_ptr() for v in adapter.values()]
    assert len(set(storages)) == len(storages) and not packed & set(storages)
    weights = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert len(weights) == len(adapter)
    for name, w in weights.items():
        live = next(v for k, v in trained.items()
                    if k.replace(".default", "") == name)
        assert torch.equal(w, live.detach().cpu())
