"""loss.py: the chunked linear + cross-entropy equals the full one (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorapool.service.train.loss import chunked_linear_cross_entropy, shifted_targets
from lorapool.service.train.resolve import IGNORE_INDEX


def _case(dtype, n=37, h=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.randperm(n, generator=g)[: n // 3]] = IGNORE_INDEX  # a third carries no loss
    target[:6] = IGNORE_INDEX  # a whole chunk without labels (chunk sizes 1 and 5)
    return hidden, weight, target


def _full(hidden, weight, target):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-5, atol=1e-5)),
                                       (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))])
@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_chunked_equals_full_loss_and_hidden_grad(dtype, tol, chunk):
    hidden, weight, target = _case(dtype)
    h_ref = hidden.clone().requires_grad_(True)
    ref = _full(h_ref, weight, target)
    ref.backward(torch.tensor(0.7))  # a non-unit incoming gradient, as loss / n_labels gives
    h = hidden.clone().requires_grad_(True)
    got = chunked_linear_cross_entropy(h, weight, target, chunk=chunk)
    got.backward(torch.tensor(0.7))
    torch.testing.assert_close(got, ref, **tol)
    assert h.grad.dtype == dtype
    torch.testing.assert_close(h.grad.float(), h_ref.grad.float(), **tol)
    assert h.grad[:6].abs().max() == 0  # rows without a label get no gradient


def test_trainable_head_gets_the_same_weight_gradient():
    hidden, weight, target = _case(torch.float32)
    w_ref = weight.clone().requires_grad_(True)
    h_ref = hidden.clone().requires_grad_(True)
    _full(h_ref, w_ref, target).backward()
    w = weight.clone().requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    chunked_linear_cross_entropy(h, w, target, chunk=7).backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-5)


def test_frozen_bias_is_added():
    hidden, weight, target = _case(torch.float32)
    bias = torch.randn(weight.shape[0])
    ref = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction="sum")
    got = chunked_linear_cross_entropy(hidden, weight, target, bias=bias, chunk=8)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_no_grad_computes_no_gradient_buffers():
    hidden, weight, target = _case(torch.float32)
    with torch.no_grad():
        got = chunked_linear_cross_entropy(hidden.requires_grad_(True), weight, target, chunk=4)
    assert not got.requires_grad
    torch.testing.assert_close(got, _full(hidden.detach(), weight, target))


def test_shifted_targets_predict_the_next_token():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 8]])
    assert shifted_targets(labels).tolist() == [[5, 6, IGNORE_INDEX, 8, IGNORE_INDEX]]
