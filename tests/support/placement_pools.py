"""Random pools of simulated GPU nodes for the placer's property tests."""

from __future__ import annotations

import random

from lorapool.service.pool.placement import NodeView
from lorapool.service.train.spec import DeviceInfo

GiB = 1024**3


def random_pool(rng: random.Random, n: int, *, frees: bool = False) -> list[NodeView]:
    """`n` nodes of mixed device classes, sizes, free memory, loads, speeds and cached base
    models ("a", "b", "c"); with `frees`, each also says when its memory frees up (the placer's
    waiting and reservation paths read it)."""
    nodes = []
    for k in range(n):
        cc = rng.choice([(7, 5), (8, 6), (8, 9)])
        total = rng.choice([4, 6, 8, 12, 16, 24]) * GiB
        dev = DeviceInfo(kind="cuda", name=f"gpu{k}", total_memory=total, compute_capability=cc)
        node = NodeView(
            node_id=f"id{k}", name=f"n{k:03d}", device=dev,
            free_memory=int(total * rng.uniform(0.05, 1.0)),
            running_jobs=rng.randint(0, 3), speed=rng.choice([10.0, 20.0, 40.0, 80.0]),
            cached_models=frozenset(rng.sample(["a", "b", "c"], rng.randint(0, 2))))
        if frees:
            node.frees_in, node.free_at_end = rng.uniform(60, 7200), total
        nodes.append(node)
    return nodes
