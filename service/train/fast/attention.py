"""Padding-free attention: packed documents in one row, never attending across each other.

With padding_free on, the trainer feeds one flat row per micro-batch, `position_ids`
restarting at 0 where every example starts, and no attention mask (tcore's `FlatCollator`).
`DOC_ATTENTION` is registered with transformers' `AttentionInterface` (the attention function)
and `AttentionMaskInterface` (a mask function that builds nothing, so no seq^2 mask ever
exists); the model is loaded with `attn_implementation=DOC_ATTENTION`. The attention function
finds the documents from `position_ids`, which Llama passes through to it, and:

- CUDA: the documents' bounds are read once per forward; a row of one document is a single
  causal SDPA call (flash attention), a row of a few documents one SDPA call per document, and a
  row of many (short chat examples) one compiled `flex_attention` call with a document-causal
  `BlockMask` (blocks that cross documents are skipped, not computed and masked) where
  flex_attention compiles (compute capability >= 8.0, triton), else SDPA per document;
- elsewhere (the CPU, older GPUs): SDPA once per document, causal, which is exact.

A batch that does come with an attention mask (padded evaluation batches) goes through
transformers' own SDPA path with that mask, so the implementation is safe for any batch.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DOC_ATTENTION = "lorapool_doc_attention"

_registered = False


def register_doc_attention() -> str:
    """Register the attention and mask functions with transformers (idempotent); the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(DOC_ATTENTION, doc_attention_forward)
        AttentionMaskInterface.register(DOC_ATTENTION, doc_attention_mask)
        _registered = True
    return DOC_ATTENTION


# -- documents ------------------------------------------------------------------------------------


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document index of every token: a new document starts wherever position_ids == 0
    (and at the first token of a row)."""
    starts = position_ids == 0
    starts[:, 0] = True
    return starts.cumsum(-1) - 1


def document_bounds(position_ids_row: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end), ...] of the documents of one row of position_ids."""
    starts = (position_ids_row == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [int(position_ids_row.shape[-1])]
    return list(zip(starts, ends))


# -- mask function: nothing to build --------------------------------------------------------------


def doc_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                       kv_offset: int = 0, mask_function: Callable | None = None,
                       attention_mask: Optional[torch.Tensor] = None, **kwargs: Any):
    """The mask function for `DOC_ATTENTION`: None (documents come from position_ids) unless a
    real padding mask came with the batch, which transformers' SDPA mask then honours."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                     mask_function or causal_mask_function, attention_mask, **kwargs)


# -- attention ------------------------------------------------------------------------------------


def _expand_kv(module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor):
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return key, value


def per_document_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      position_ids: torch.Tensor, *, scaling: Optional[float] = None,
                      dropout: float = 0.0) -> torch.Tensor:
    """Causal SDPA run separately on every document; (B, H, T, D) in, (B, T, H, D) out.

    key/value already have as many heads as query.
    """
    rows = []
    for b in range(query.shape[0]):
        pieces = []
        for s, e in document_bounds(position_ids[b]):
            pieces.append(F.scaled_dot_product_attention(
                query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                dropout_p=dropout, is_causal=True, scale=scaling))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous()


def flex_attention_supported(device: torch.device) -> tuple[bool, str]:
    """Whether the compiled flex_attention document path can run on `device`."""
    if device.type != "cuda":
        return False, "flex_attention path is for CUDA (the CPU uses per-document SDPA)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False, "flex_attention's Triton kernels need compute capability >= 8.0"
    try:
        import triton  # noqa: F401
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as exc:
        return False, f"flex_attention not importable ({type(exc).__name__}: {exc})"
    return True, ""


_FLEX: dict[str, Any] = {}
_BLOCK_MASK_CACHE: dict[str, Any] = {"pos": None, "mask": None}


def _flex_fn(compiled: bool):
    key = "compiled" if compiled else "eager"
    if key not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        # Flat rows change length every micro-batch: compile with dynamic shapes so a new
        # length does not recompile (and, past the recompile limit, fall back to the unfused
        # reference that materialises the scores).
        _FLEX[key] = torch.compile(flex_attention, dynamic=True) if compiled else flex_attention
    return _FLEX[key]


def document_block_mask(position_ids: torch.Tensor, batch: int, n_tokens: int,
                        compiled: bool = True):
    """flex_attention BlockMask for document-causal attention, cached for the last
    position_ids tensor (every layer, and the checkpoint recompute, reuse it). Compiled, the
    mask is built block by block and never as a (T, T) tensor."""
    from torch.nn.attention.flex_attention import create_block_mask

    cached = _BLOCK_MASK_CACHE["pos"]
    if cached is not None and cached() is position_ids and \
            _BLOCK_MASK_CACHE["version"] == position_ids._version:
        return _BLOCK_MASK_CACHE["mask"]
    docs = document_ids(position_ids.expand(batch, -1))

    def doc_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    mask = create_block_mask(doc_causal, B=docs.shape[0], H=None, Q_LEN=n_tokens,
                             KV_LEN=n_tokens, device=position_ids.device, _compile=compiled)
    _BLOCK_MASK_CACHE.update(pos=weakref.ref(position_ids), version=position_ids._version,
                             mask=mask)
    return mask


def flex_document_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            position_ids: torch.Tensor, *, scaling: Optional[float] = None,
                            compiled: bool = True) -> torch.Tensor:
    """Document-causal flex_attention; (B, H, T, D) in (key/value may have fewer heads: GQA),
    (B, T, H, D) out."""
    block_mask = document_block_mask(position_ids, query.shape[0], query.shape[2], compiled)
    gqa = key.shape[1] != query.shape[1]
    out = _flex_fn(compiled)(query, key, value, block_mask=block_mask, scale=scaling,
                             enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


_FLEX_OK: dict[torch.device, bool] = {}


# A flat row of at most this many documents runs SDPA (flash) once per document; more, and one
# flex_attention call that skips the blocks crossing documents is cheaper than many launches.
MAX_DOCS_PER_ROW_FOR_SDPA = 8
_BOUNDS_CACHE: dict[str, Any] = {"pos": None}
# Set while a CUDA graph is captured (fast/graphs.py): the documents are known on the host, and
# reading them from the device would be a sync the capture cannot contain. A plain global, not
# a context variable: the checkpointed layers recompute on the autograd engine's own thread.
_KNOWN_BOUNDS: Optional[list[list[tuple[int, int]]]] = None


def set_known_bounds(bounds: Optional[list[list[tuple[int, int]]]]) -> None:
    """Declare every row's documents (None: read them from position_ids again)."""
    global _KNOWN_BOUNDS
    _KNOWN_BOUNDS = bounds


def cached_document_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """`document_bounds` of every row, computed once per position_ids tensor: every layer (and
    the checkpoint recompute) of one forward shares it, so the device sync happens once."""
    if _KNOWN_BOUNDS is not None:
        return _KNOWN_BOUNDS
    cached = _BOUNDS_CACHE["pos"]
    if cached is not None and cached() is position_ids and \
            _BOUNDS_CACHE["version"] == position_ids._version:
        return _BOUNDS_CACHE["bounds"]
    bounds = [document_bounds(row) for row in position_ids.detach().cpu()]
    _BOUNDS_CACHE.update(pos=weakref.ref(position_ids), version=position_ids._version,
                         bounds=bounds)
    return bounds


def _sdpa_by_bounds(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    bounds: list[list[tuple[int, int]]], scaling: Optional[float],
                    dropout: float) -> torch.Tensor:
    """Causal SDPA per document from known bounds; (B, H, T, D) in, (B, T, H, D) out. A row of
    one document is a single causal SDPA call (flash attention on a GPU)."""
    gqa = key.shape[1] != query.shape[1]
    n = query.shape[2]
    if all(len(row) == 1 and row[0] == (0, n) for row in bounds):
        # Every row is one whole document: a single batched causal call.
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout,
                                             is_causal=True, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous()
    rows = []
    for b, row in enumerate(bounds):
        pieces = [F.scaled_dot_product_attention(
            query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
            dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa) for s, e in row]
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous()


def doc_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                          dropout: float = 0.0, scaling: Optional[float] = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function for `DOC_ATTENTION` (see the module docstring)."""
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        # A padded batch, no documents to find, or decoding with a cache: plain SDPA is exact.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    device = query.device
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    if device.type == "cuda":
        bounds = cached_document_bounds(position_ids)
        most = max(len(row) for row in bounds)
        if dropout == 0.0 and most > MAX_DOCS_PER_ROW_FOR_SDPA:
            if device not in _FLEX_OK:
                _FLEX_OK[device] = flex_attention_supported(device)[0]
            if _FLEX_OK[device]:
                try:
                    return flex_document_attention(query, key, value, position_ids,
                                                   scaling=scaling), None
                except Exception as exc:  # noqa: BLE001 - inductor has no kernel for this shape
                    # e.g. head dims too small for its templates: per-document SDPA is exact.
                    log.warning("flex_attention failed (%s: %s); per-document SDPA from now on",
                                type(exc).__name__, str(exc).splitlines()[0][:200])
                    _FLEX_OK[device] = False
        return _sdpa_by_bounds(query, key, value, bounds, scaling, dropout), None
    key, value = _expand_kv(module, key, value)
    return per_document_sdpa(query, key, value, position_ids, scaling=scaling,
                             dropout=dropout), None
