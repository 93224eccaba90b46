"""Padding-free attention: a packed flat row gives each example's unpacked loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorapool.service.train.fast.attention import (
    DOC_ATTENTION,
    doc_attention_mask,
    document_bounds,
    document_ids,
    flex_document_attention,
    per_document_sdpa,
    register_doc_attention,
)

IGNORE = -100


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    register_doc_attention()
    kw = dict(dtype=torch.float32, local_files_only=True)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", **kw)
    doc = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=DOC_ATTENTION,
                                               **kw)
    assert doc.config._attn_implementation == DOC_ATTENTION
    return ref.eval(), doc.eval()


def _examples(vocab: int, lengths=(5, 11, 2, 8)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(6, vocab, (n,), generator=g) for n in lengths]


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE, reduction="sum")


def _packed(examples):
    ids = torch.cat(examples)[None]
    pos = torch.cat([torch.arange(len(e)) for e in examples])[None]
    labels = torch.cat([torch.cat([torch.tensor([IGNORE]), e[1:]]) for e in examples])
    return ids, pos, labels


def test_packed_row_equals_unpacked_examples(models):
    ref, doc = models
    examples = _examples(ref.config.vocab_size)
    with torch.no_grad():
        want = [_loss_sum(ref(input_ids=e[None]).logits[0], e) for e in examples]
        ids, pos, labels = _packed(examples)
        logits = doc(input_ids=ids, position_ids=pos).logits[0]
        # Plain SDPA over the same packed row (no mask) is the wrong answer this guards against.
        leaky = ref(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits[0]
    start = 0
    for e, w in zip(examples, want):
        end = start + len(e)
        lab = labels[start:end]
        got = _loss_sum(logits[start:end], lab)
        assert torch.allclose(got, w, atol=1e-4, rtol=1e-5)
        start = end
    last = slice(len(examples[0]), len(examples[0]) + len(examples[1]))
    assert not torch.allclose(_loss_sum(leaky[last], labels[last]), want[1], atol=1e-3)


def test_gradients_match_unpacked(models):
    ref, doc = models
    examples = _examples(ref.config.vocab_size, (4, 7))
    ids, pos, labels = _packed(examples)
    doc.zero_grad()
    _loss_sum(doc(input_ids=ids, position_ids=pos).logits[0], labels).backward()
    got = {n: p.grad.clone() for n, p in doc.named_parameters()}
    ref.zero_grad()
    sum(_loss_sum(ref(input_ids=e[None]).logits[0], e) for e in examples).backward()
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_padded_batch_still_works(models):
    """A batch that does come with a padding mask (evaluation) is exact through SDPA."""
    ref, doc = models
    ids = torch.randint(6, ref.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = doc(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a[0], b[0], atol=1e-5)
    assert torch.allclose(a[1, :6], b[1, :6], atol=1e-5)


def test_documents_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]])
    assert document_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert document_bounds(pos[0]) == [(0, 3), (3, 5), (5, 6), (6, 8)]
    assert doc_attention_mask(1, 8, 8) is None  # no seq^2 mask is ever built for a flat row
    assert doc_attention_mask(1, 8, 8, attention_mask=torch.ones(1, 8, dtype=torch.bool)) is None


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_document_mask_matches_per_document_sdpa():
    """The CUDA path's BlockMask logic, checked eagerly on the CPU against the exact path."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7]])
    q = torch.randn(1, 4, 16, 8)
    k = torch.randn(1, 2, 16, 8)  # GQA: 2 key/value heads for 4 query heads
    v = torch.randn(1, 2, 16, 8)
    want = per_document_sdpa(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), pos)
    try:
        got = flex_document_attention(q, k, v, pos, compiled=False)
    except Exception as exc:  # eager flex is a reference mode; some builds refuse it on CPU
        pytest.skip(f"eager flex_attention unavailable on this CPU build: {exc}")
    assert torch.allclose(got, want, atol=1e-5)
