"""CUDA-graph micro-steps (fast/graphs.py): padding to a bucket, static buffers, accumulation.

A CUDA graph cannot exist on this CPU-only machine, so these tests run `GraphedSteps` with
`use_cuda_graphs=False`: "capture" then keeps the very function a graph would record, and
"replay" runs it again on the same static buffers. What is tested is everything around the
graph: which batches are graphed, the bucket padding (which must not change the loss or any
gradient), the copy of every batch into the shared buffers, gradients accumulating into the
seated `.grad` buffers across micro-batches and steps, and the fallback when a capture fails.
The real capture and replay run in the `-m gpu` test at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("bitsandbytes")

from lorapool.service.train import LoraSpec, TrainSpec  # noqa: E402
from lorapool.service.train.fast import graphs as graphs_mod  # noqa: E402
from lorapool.service.train.fast.graphs import (  # noqa: E402
    GraphedSteps,
    bucket_length,
    pad_batch,
    single_document_rows,
)
from lorapool.service.train.loop import Trainer  # noqa: E402
from lorapool.service.train.resolve import IGNORE_INDEX  # noqa: E402

FORCED = {"fused_lora": "on", "grouped_lora": "on", "offload_activations": "on",
          "padding_free": "on", "chunked_loss": "on"}


def _spec(model_dir: Path, **kw) -> TrainSpec:
    base = {"base_model": str(model_dir), "device": "cpu", "compute_dtype": "fp32",
            "max_seq_len": 64, "batch_size": 4, "micro_batch_size": 1, "learning_rate": 5e-3,
            "lora": LoraSpec(r=8, alpha=16, dropout=0.0), "max_steps": 4, "seed": 3,
            "fast": FORCED}
    base.update(kw)
    return TrainSpec(**base)


def _trainer(model_dir: Path, data: Path, out: Path, **kw) -> Trainer:
    t = Trainer(_spec(model_dir, **kw), str(data), out)
    t._setup()
    return t


def _graphs(t: Trainer) -> GraphedSteps:
    return GraphedSteps(t.model, t.params, t.device, use_cuda_graphs=False,
                        max_tokens=t.spec.micro_batch_size * t.spec.max_seq_len,
                        hidden_size=t.model.get_base_model().config.hidden_size)


def _grads(t: Trainer) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in t.params]


def _zero(t: Trainer) -> None:
    for p in t.params:
        p.grad = None


def _assert_graphs_match_eager(t: Trainer, g: GraphedSteps, batch: dict, scale: float) -> None:
    """Warm-up, capture and replay of `batch` through `g` each give the eager step's loss and
    gradients (the loss scaled by `scale`)."""
    graphed = g.prepare(batch)
    assert graphed is not None
    _zero(t)
    ref_loss, _ = t._loss_sum(batch)
    (ref_loss * scale).backward()
    ref = _grads(t)
    for attempt in ("warm-up", "capture", "replay"):
        _zero(t)
        loss = g.run(graphed, scale)
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-5, msg=attempt)
        for a, b in zip(_grads(t), ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=attempt)


def _assert_same_adapters(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.fixture
def data(tmp_path, toy_data) -> Path:
    return toy_data.write_jsonl(tmp_path / "train.jsonl", toy_data.chat_records(16))


def test_bucket_lengths() -> None:
    assert bucket_length(1, 4096) == 64
    assert bucket_length(64, 4096) == 64
    assert bucket_length(65, 4096) == 128
    assert bucket_length(513, 4096) == 768
    assert bucket_length(2048, 2048) == 2048
    assert bucket_length(100, 90) == 100  # never shorter than the row, never past the cap
    assert bucket_length(70, 100) == 100


def test_only_one_document_rows_are_graphed() -> None:
    ramp = torch.arange(6)[None]
    assert single_document_rows(ramp.expand(2, 6))
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert not single_document_rows(packed)
    batch = {"input_ids": torch.ones(1, 6, dtype=torch.long), "labels": torch.ones(1, 6,
             dtype=torch.long), "position_ids": ramp}
    padded = pad_batch(batch, 10)
    assert padded["input_ids"].shape == (1, 10)
    assert padded["position_ids"].tolist() == [list(range(10))]
    assert (padded["labels"][:, 6:] == IGNORE_INDEX).all()
    assert torch.equal(padded["labels"][:, :6], batch["labels"])


def test_graphed_step_equals_eager_step(tiny_model_dir, data, tmp_path) -> None:
    """Warm-up, capture and replay of a padded batch: the eager path's loss and gradients."""
    t = _trainer(tiny_model_dir, data, tmp_path / "out")
    g = _graphs(t)
    rows = t._rows(t.train_data, [0])
    (batch,) = t._micro_batches(rows, 1)
    n = batch["input_ids"].shape[1]
    assert n % 64, "the row must need padding for this test to mean anything"

    assert g.prepare(batch)["input_ids"].shape[1] == bucket_length(n, 64)
    _assert_graphs_match_eager(t, g, batch, 0.25)
    assert g.captured == 1 and g.replays == 2 and g.disabled is None


def test_graphs_accumulate_over_micro_batches(tiny_model_dir, data, tmp_path) -> None:
    """Two shapes, each replayed: the sum of the eager micro-batches' gradients."""
    t = _trainer(tiny_model_dir, data, tmp_path / "out")
    g = _graphs(t)
    rows = t._rows(t.train_data, list(range(8)))
    batches = t._micro_batches(rows, 1)
    _zero(t)
    for b in batches:
        loss, _ = t._loss_sum(b)
        (loss / 10).backward()
    ref = _grads(t)
    for _ in range(2):  # warm up and capture every shape first
        _zero(t)
        for b in batches:
            g.run(g.prepare(b), 0.1)
    _zero(t)
    for b in batches:  # now every batch replays
        g.run(g.prepare(b), 0.1)
    for a, b in zip(_grads(t), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert g.captured >= 1 and g.disabled is None


def test_training_with_graphs_gives_the_same_adapter(tiny_model_dir, data, tmp_path) -> None:
    """A whole run through the loop (steps of 4 micro-batches, the optimizer between them)."""
    plain = _trainer(tiny_model_dir, data, tmp_path / "plain")
    plain.run()
    graphed = _trainer(tiny_model_dir, data, tmp_path / "graphed")
    graphed.graphs = _graphs(graphed)
    result = graphed.run()
    assert result.metrics["cuda_graphs"]["replays"] > 0
    _assert_same_adapters(tmp_path / "plain", tmp_path / "graphed")


def test_graphs_accumulate_into_the_flat_optimizer_buffers(tiny_model_dir, data, tmp_path):
    """flat_optimizer on (fast/flat_params.py): the graphs take the packed views as their
    gradient buffers instead of seating their own, and the run trains the same adapter."""
    plain = _trainer(tiny_model_dir, data, tmp_path / "plain", optimizer="adamw")
    plain.run()
    packed = _trainer(tiny_model_dir, data, tmp_path / "packed", optimizer="adamw",
                      fast={**FORCED, "flat_optimizer": "on"})
    assert packed.flat is not None
    packed.graphs = _graphs(packed)
    result = packed.run()
    assert result.metrics["cuda_graphs"]["replays"] > 0
    assert packed.flat.intact()  # the graphs wrote into the views, never replaced them
    _assert_same_adapters(tmp_path / "plain", tmp_path / "packed")


def test_a_flat_row_of_several_examples_is_split_and_graphed(tiny_model_dir, data, tmp_path):
    """Micro-batch 4 of examples of different lengths: FlatCollator makes one flat row of four
    documents; the graphs take them as four padded rows, with the eager step's loss and
    gradients."""
    t = _trainer(tiny_model_dir, data, tmp_path / "out", micro_batch_size=4)
    g = _graphs(t)
    rows = t._rows(t.train_data, list(range(4)))
    (batch,) = t._micro_batches(rows, 4)
    lengths = sorted(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape[0] == 1 and len(set(lengths)) > 1, "needs a flat row"
    assert g.prepare(batch)["input_ids"].shape == (4, bucket_length(lengths[-1], 64))
    _assert_graphs_match_eager(t, g, batch, 0.1)
    # A row whose second document does not count from 0 is not a row of examples: eager.
    odd = {"input_ids": torch.ones(1, 6, dtype=torch.long),
           "labels": torch.ones(1, 6, dtype=torch.long),
           "position_ids": torch.tensor([[0, 1, 2, 0, 2, 3]])}
    assert g.prepare(odd) is None


def test_a_failed_capture_turns_graphs_off_and_loses_nothing(tiny_model_dir, data, tmp_path,
                                                             monkeypatch) -> None:
    events = []
    plain = _trainer(tiny_model_dir, data, tmp_path / "plain")
    plain.run()
    t = Trainer(_spec(tiny_model_dir), str(data), tmp_path / "graphed", on_event=events.append)
    t._setup()
    t.graphs = _graphs(t)

    def broken(self, key, batch):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs_mod.GraphedSteps, "_capture", broken)
    result = t.run()
    assert result.status == "completed"
    assert "capture failed" in t.graphs.disabled
    warnings = [e for e in events if e.type == "warning" and "CUDA graphs off" in (e.message or "")]
    assert len(warnings) == 1
    _assert_same_adapters(tmp_path / "plain", tmp_path / "graphed")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_the_eager_step_on_the_gpu(tiny_model_dir, data, tmp_path) -> None:
    """The real thing: warm-up, capture and replays of a CUDA graph give the eager step's loss
    and gradients, also after the weights changed (a graph must never read stale casts)."""
    from lorapool.service.train.fast import lora

    t = _trainer(tiny_model_dir, data, tmp_path / "out", device="cuda", compute_dtype="bf16",
                 fast="auto")
    assert t.graphs is not None, t.plan.reasons["cuda_graphs"]
    with torch.no_grad():  # non-zero B, or every A gradient is zero and proves nothing
        gen = torch.Generator(device="cuda").manual_seed(0)
        for name, p in t.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
    (batch,) = t._micro_batches(t._rows(t.train_data, [0]), 1)
    graphed = t.graphs.prepare(batch)
    assert graphed is not None

    def compare(label: str) -> None:
        _zero(t)
        with t.graphs.eager_stream():  # where the loop runs an ungraphed micro-batch
            ref_loss, _ = t._loss_sum(batch)
            (ref_loss * 0.5).backward()
        # As the loop does: no live reference to the eager step's autograd graph may meet a
        # capture (its accumulate-grad nodes belong to another stream).
        ref_value = float(ref_loss)
        del ref_loss
        ref = _grads(t)
        _zero(t)
        loss = t.graphs.run(graphed, 0.5)
        assert abs(float(loss) - ref_value) <= 1e-2 * abs(ref_value), label
        for a, b in zip(_grads(t), ref):
            assert _rel(a, b) < 3e-2, (label, _rel(a, b))

    for label in ("warm-up", "capture", "replay"):
        compare(label)
    with torch.no_grad():  # what an optimizer step does: new weights, casts dropped
        for p in t.params:
            p.add_(torch.randn_like(p) * 0.05)
    lora.drop_step_caches()
    compare("replay after the weights changed")
    assert t.graphs.captured == 1 and t.graphs.replays >= 3 and t.graphs.disabled is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_train_like_the_eager_fast_path(tiny_model_dir, data, tmp_path) -> None:
    """A whole run with graphs and one without: the same per-step losses (bf16 tolerance)."""
    losses: dict[str, list[float]] = {"on": [], "off": []}
    for mode in ("off", "on"):
        fast = "auto" if mode == "on" else {"cuda_graphs": "off"}
        t = Trainer(_spec(tiny_model_dir, device="cuda", compute_dtype="bf16", fast=fast,
                          max_steps=6), str(data), tmp_path / mode,
                    on_event=lambda e, m=mode: losses[m].append(e.loss) if e.type == "step" else None)
        result = t.run()
    summary = result.metrics["cuda_graphs"]
    assert "disabled" not in summary and summary["replays"] >= 1, summary
    assert len(losses["on"]) == len(losses["off"]) == 6
    for a, b in zip(losses["on"], losses["off"]):
        assert abs(a - b) <= 2e-2 * abs(b), (losses["on"], losses["off"])
