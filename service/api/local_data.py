"""Checks for jobs that train on a node-local data set or start from an adapter.

Shared by POST /v1/fine_tuning/jobs and POST /v1/federations. A node-local data set is named
`"NODE:NAME"` (or `{"node": NODE, "name": NAME}`); the node's own validation result (counts and
line errors, reported by its NodeAgent) decides here, so a bad data set is a 400 naming its bad
lines although the server never sees the file. The job is then pinned to that node.
"""

from __future__ import annotations

from typing import Any, Optional

from ..pool.local_data import parse_ref
from .context import AppContext
from .errors import APIError, bad_request


def check_dataset(ctx: AppContext, value: Any, param: str, tenant: str) -> dict[str, Any]:
    """{"node", "name", "examples"} for a data set some node offers to `tenant` and validated
    there, else a 400. A set the donor did not grant to `tenant` reads as not offered."""
    try:
        node_name, name = parse_ref(value)
    except ValueError as exc:
        raise bad_request(f"Invalid value for '{param}': {exc}", param=param) from None
    nodes = list(ctx.executor.nodes())
    node = next((n for n in nodes if node_name in (n.name, n.id)), None)
    if node is None:
        known = sorted(n.name for n in nodes if getattr(n, "datasets", None))
        raise bad_request(f"Invalid value for '{param}': no node named '{node_name}' is in the "
                          f"pool (nodes offering data sets: {', '.join(known) or 'none'})",
                          param=param, code="dataset_not_found")
    offered = {d.name: d for d in usable_datasets(node, tenant)}
    info = offered.get(name)
    if info is None:
        raise bad_request(f"Invalid value for '{param}': node '{node.name}' offers no data set "
                          f"'{name}' (it offers: {', '.join(sorted(offered)) or 'none'})",
                          param=param, code="dataset_not_found")
    if not info.valid:
        raise bad_request(f"Invalid value for '{param}': data set '{name}' on node '{node.name}' "
                          "failed validation there:\n" + "\n".join(info.errors),
                          param=param, code="invalid_training_file")
    return {"node": node.name, "name": name, "examples": info.examples}


def usable_datasets(node: Any, tenant: str) -> list[Any]:
    """The data sets of `node` its donor granted to `tenant`."""
    return [d for d in getattr(node, "datasets", None) or []
            if tenant in (getattr(d, "tenants", None) or [])]


def nodes_for(ctx: AppContext, tenant: str) -> list[Any]:
    """GET /v1/nodes as `tenant` sees it: each node's data sets cut to those it may use (the
    grants themselves are never serialised)."""
    out = []
    for node in ctx.executor.nodes():
        out.append(node.model_copy(update={"datasets": usable_datasets(node, tenant)}))
    return out


def pin_to_dataset_node(placement: dict[str, Any], dataset: Optional[dict[str, Any]],
                        param: str = "placement.node") -> dict[str, Any]:
    """The job's placement with `node` set to the data set's node (a different pin is a 400)."""
    if dataset is None:
        return placement
    pinned = placement.get("node")
    if pinned and pinned != dataset["node"]:
        raise bad_request(f"Invalid value for '{param}': the job's data set lives on node "
                          f"'{dataset['node']}', so it cannot run on '{pinned}'", param=param)
    return {**placement, "node": dataset["node"]}


def check_init_adapter(ctx: AppContext, owner: str, adapter_id: Optional[str],
                       model_sha256: Optional[str], param: str = "init_adapter") -> None:
    """The adapter to start from must be the caller's and be for the job's base model."""
    if adapter_id is None:
        return
    rec = ctx.store.get_adapter(adapter_id, owner)
    if rec is None:
        raise APIError(400, f"Invalid value for '{param}': no adapter of yours with id "
                       f"'{adapter_id}'", param=param, code="adapter_not_found")
    if model_sha256 and rec.base_model_sha256 and rec.base_model_sha256 != model_sha256:
        raise bad_request(f"Invalid value for '{param}': adapter '{adapter_id}' was trained on "
                          f"another base model ({rec.base_model})", param=param)
