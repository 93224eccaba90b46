"""Frozen input embeddings kept in pinned host memory instead of on the GPU.

A Llama-3 vocabulary of 128,256 rows makes the input embedding 0.5 GiB (1B) to 1 GiB (8B) in
bf16: on an 8 GB card that is an eighth of the card for a table that training never updates
(LoRA adapts the linear layers) and that each step reads only `tokens` rows of. `HostEmbedding`
keeps the table in pinned host memory, gathers the step's rows there and sends just those to
the GPU (tokens x hidden values: a few MiB). An embedding tied to the output head stays where it
is: the head needs the whole table on the GPU for every token anyway.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class HostEmbedding(torch.nn.Module):
    """A frozen `nn.Embedding` whose table lives in (pinned) host memory; outputs go to `device`."""

    def __init__(self, embedding: torch.nn.Embedding, device: torch.device) -> None:
        super().__init__()
        weight = embedding.weight.detach().to("cpu")
        if device.type == "cuda":
            weight = weight.pin_memory()
        # A buffer, not a parameter: nothing trains it, and model.to()/device maps leave it be.
        self.register_buffer("weight", weight, persistent=False)
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape
        self.device = device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids.to("cpu"), self.weight, self.padding_idx)
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on host, output to {self.device}"

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # model.to(...) / .cuda() must not pull the table back onto the GPU.
        return self


def set_input_embedding(hf: torch.nn.Module, module: torch.nn.Module) -> None:
    """`hf.set_input_embeddings(module)`, keeping what enable_input_require_grads did: it hooked
    the old module, and checkpointed layers (and their offload) need inputs that require grad,
    so the new one is hooked instead."""
    hooked = getattr(hf, "_require_grads_hook", None) is not None
    hf.set_input_embeddings(module)
    if hooked:
        hf._require_grads_hook.remove()
        hf.enable_input_require_grads()


def move_input_embeddings_to_host(model: torch.nn.Module) -> str:
    """Swap the model's input embedding for a `HostEmbedding`; what was done, for the events."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = hf.get_input_embeddings()
    if not isinstance(emb, torch.nn.Embedding) or emb.weight.device.type != "cuda":
        return "off: the input embedding is not a CUDA nn.Embedding"
    if emb.weight.requires_grad:
        return "off: the input embedding is trained"
    head = hf.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is emb.weight:
        return "off: the input embedding is tied to the output head (the head needs it on the GPU)"
    size = emb.weight.numel() * emb.weight.element_size()
    set_input_embedding(hf, HostEmbedding(emb, emb.weight.device))
    del emb
    torch.cuda.empty_cache()
    return f"input embedding ({size / 2**20:.0f} MiB) in pinned host memory"
