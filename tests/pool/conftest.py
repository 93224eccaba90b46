"""Fixtures the pool's placement tests share."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """Llama-3.2-1B's shape as a config folder without weights: what the placer's memory
    estimate reads (read-only)."""
    from lorapool.service.train.tiny import make_random_llama

    return make_random_llama(tmp_path_factory.mktemp("m") / "1b", "1b", write_weights=False)
