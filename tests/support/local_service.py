"""A whole lorapool service on this machine for end-to-end tests: a tiny random Llama registered
as "tiny-llama", one token per tenant, a real local Ray head with one CPU-only node, and uvicorn
on a free loopback port.

Ray startup is the expensive part, so the e2e modules wrap this in one module-scoped fixture
each and add their own data on top.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 1024**3


@dataclass
class LocalService:
    svc: Any  # lorapool.service.server.Service, started
    settings: Any  # its lorapool.service.config.Settings
    tokens: dict[str, str]  # tenant → bearer token
    root: Path  # the folder holding the model, the data dir and the node's work dir
    model_dir: Path  # the tiny Llama registered as "tiny-llama"
    shas: dict[str, str]  # registered model name → its sha256


@contextmanager
def local_service(root: Path, tenants: Sequence[str] = ("acme", "globex"),
                  extra_models: Mapping[str, Path] | None = None) -> Iterator[LocalService]:
    """Start the service under `root`, with `extra_models` (name → folder) registered next to
    "tiny-llama"; stopped (Ray included) when the block ends."""
    from lorapool.service.admin import add_model, create_token
    from lorapool.service.config import Settings
    from lorapool.service.server import Service, free_port
    from lorapool.service.train.tiny import make_tiny_llama

    model_dir = make_tiny_llama(root / "tiny-llama")
    settings = Settings.from_env(data_dir=root / "data", host="127.0.0.1", port=free_port())
    shas = {"tiny-llama": add_model(settings, "tiny-llama", model_dir).sha256}
    for name, folder in (extra_models or {}).items():
        shas[name] = add_model(settings, name, folder).sha256
    tokens = {t: create_token(settings, t) for t in tenants}
    svc = Service(
        settings,
        local_node_options={"name": "local-cpu", "cpu_only": True, "cpu_memory": 8 * GiB,
                            "work_dir": str(root / "node-local")},
        ray_init_options={"num_cpus": 2},
    )
    svc.start()
    try:
        yield LocalService(svc, settings, tokens, root, model_dir, shas)
    finally:
        svc.stop()
