"""fast/embeddings.py: the host-memory input embedding gives the same rows as nn.Embedding and
is refused where it cannot help (tied to the head, trained, not on a GPU)."""

from __future__ import annotations

import torch

from lorapool.service.train.fast.embeddings import HostEmbedding, move_input_embeddings_to_host
from lorapool.service.train.tiny import make_random_llama


def test_host_embedding_rows_equal_nn_embedding():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, padding_idx=0)
    emb.weight.requires_grad_(False)
    host = HostEmbedding(emb, torch.device("cpu"))
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(host(ids), emb(ids))
    host.to(torch.float64)  # model.to(...) leaves the host table alone
    assert host.weight.dtype == torch.float32 and host.weight.device.type == "cpu"


def test_refused_where_it_cannot_help(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = make_random_llama(tmp_path / "m", "tiny")
    model = AutoModelForCausalLM.from_pretrained(folder)
    for p in model.parameters():
        p.requires_grad_(False)
    # Weights on the CPU: nothing to save.
    assert move_input_embeddings_to_host(model).startswith("off")
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    model.get_input_embeddings().weight.requires_grad_(True)
    assert move_input_embeddings_to_host(model).startswith("off")
