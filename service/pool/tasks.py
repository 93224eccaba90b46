"""Short CPU tasks that run on any node of the pool: merging adapters, evaluating one,
exporting one (merged model, GGUF adapter) or the dequantised base.

Each is a Ray task (num_cpus=1) whose payload is data only: adapters, the base model and the
data file travel as {relative path: ObjectRef | bytes} bundles (see `transfer.py`), never as
paths of the head. A task writes what it receives into the node's own folder — the NodeAgent's
work_dir when the head names the agent of the node it placed the task on, else a private
temporary folder — runs the pure library (`service.merge`, `service.train.evaluation`) and
returns plain data: the merged adapter's files, or the loss. Every failure comes back as data
too, {"status": "failed", "code", "message", "retryable"}, so the head never unpickles an
exception from a node.

Payloads:
    merge:    {"merge_id", "agent": name | None, "method", "options": merge_adapters kwargs,
               "adapters": [{"id", "key", "files"}], "provenance": {...}}
    evaluate: {"evaluation_id", "agent", "spec": TrainSpec fields without base_model,
               "model": {"key", "files", "entry"}, "adapter": {"id", "key", "files"} | None,
               "data": {"key", "files", "entry"}}
    export:   {"export_id", "agent", "format": "merged" | "gguf" | "base",
               "model": {"key", "files", "entry"}, "adapter": {"id", "key", "files"} | None,
               "base_id", "trust_remote_code"}
"""

from __future__ import annotations

import json
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any, Optional

import ray

from .transfer import materialise, read_folder, write_folder

METADATA_FILE = "lorapool.json"


def _fetch(value: Any) -> bytes:
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _node_folder(agent: Optional[str]) -> tuple[Path, str]:
    """(this node's working folder, device kind): the agent's when it runs here, else a
    temporary folder of this machine (a Ray node with no NodeAgent)."""
    if agent:
        from .agent import NAMESPACE

        try:
            handle = ray.get_actor(agent, namespace=NAMESPACE)
            local = ray.get(handle.local_config.remote(), timeout=30)
            return Path(local["work_dir"]), str(local.get("device_kind") or "cpu")
        except Exception:  # the agent left meanwhile: this node's temp folder serves as well
            pass
    return Path(tempfile.gettempdir()) / "lorapool-tasks", "cpu"


def _failed(code: str, message: str, *, retryable: bool = False,
            with_traceback: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "failed", "code": code, "message": message,
                           "retryable": retryable}
    if with_traceback:
        out["traceback"] = traceback.format_exc(limit=20)
    return out


def _relabel(message: str, root: Path) -> str:
    """The message without this node's folder: the merge library names adapters by folder, and
    each folder here is named by its adapter id, so what is left are the ids the caller knows;
    a caller has no business with a donor's paths either."""
    return message.replace(f"{root}/", "").replace(str(root), "")


# -- merge ------------------------------------------------------------------------------------


def _rewrite_provenance(out_dir: Path, adapters: list[dict[str, Any]],
                        provenance: dict[str, Any]) -> None:
    """Record adapter ids (not this node's temporary paths) and the request in lorapool.json."""
    path = out_dir / METADATA_FILE
    meta = json.loads(path.read_text())
    merge = meta.setdefault("merge", {})
    for entry, src in zip(merge.get("inputs", []), adapters):
        entry.pop("path", None)
        entry["adapter_id"] = src["id"]
    merge.update({k: v for k, v in provenance.items() if v is not None})
    path.write_text(json.dumps(meta, indent=2, default=str))


def run_merge(payload: dict[str, Any]) -> dict[str, Any]:
    """Merge the payload's adapters; {"status": "succeeded", "files", "weights", "rank",
    "diagnostics", "params"} or a failure."""
    from ..merge import MergeError, merge_adapters

    work, _ = _node_folder(payload.get("agent"))
    work.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="merge-", dir=work))
    try:
        folders = []
        for a in payload["adapters"]:
            files = {name: _fetch(ref) for name, ref in a["files"].items()}
            folders.append(write_folder(files, root / a["id"]))
        out_dir = root / "merged"
        try:
            result = merge_adapters(folders, payload["method"], output_dir=out_dir,
                                    **payload.get("options", {}))
        except MergeError as exc:
            return _failed("invalid_merge", _relabel(str(exc), root))
        _rewrite_provenance(out_dir, payload["adapters"], payload.get("provenance") or {})
        diagnostics = {k: v for k, v in result.diagnostics.items()
                       if not k.endswith("_per_module")}
        return {"status": "succeeded", "files": read_folder(out_dir), "weights": result.weights,
                "rank": result.rank, "params": result.params, "diagnostics": diagnostics}
    except Exception as exc:  # a bug or a broken node: the head decides whether to retry
        return _failed("internal_error", _relabel(f"{type(exc).__name__}: {exc}", root),
                       retryable=True, with_traceback=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- evaluate ---------------------------------------------------------------------------------


def run_evaluation(payload: dict[str, Any]) -> dict[str, Any]:
    """Score base (+ adapter) on the data; {"status": "succeeded", "loss", "perplexity",
    "tokens", "examples", "seconds"} or a failure."""
    from ..train import TrainError, TrainSpec, evaluate

    work, _device_kind = _node_folder(payload.get("agent"))
    cache = work / "cache"
    try:
        model = payload["model"]
        model_dir = materialise(cache / "models", model["key"], model["files"], _fetch)
        data = payload["data"]
        data_dir = materialise(cache / "data", data["key"], data["files"], _fetch)
        adapter_dir = None
        if payload.get("adapter"):
            a = payload["adapter"]
            adapter_dir = materialise(cache / "adapters", a["key"], a["files"], _fetch)
        fields = dict(payload["spec"])
        fields["base_model"] = str(model_dir / model["entry"] if model.get("entry")
                                   else model_dir)
        # CPU always: a task here holds no GPU reservation, so it must not take GPU memory a
        # training job on this node was promised.
        fields["device"] = "cpu"
        result = evaluate(TrainSpec(**fields), adapter_dir, data_dir / data["entry"],
                          cache_dir=cache)
        return {"status": "succeeded", **result}
    except TrainError as exc:
        return _failed(exc.code, _relabel(exc.message, cache), retryable=exc.retryable)
    except Exception as exc:
        return _failed("internal_error", _relabel(f"{type(exc).__name__}: {exc}", cache),
                       retryable=True, with_traceback=True)


# -- export -----------------------------------------------------------------------------------


def run_export(payload: dict[str, Any]) -> dict[str, Any]:
    """Build a merged model, a GGUF adapter or the dequantised base; {"status": "succeeded",
    "files": {relative path: bytes}} or a failure. Only the output folder travels back."""
    import json as _json

    from ..merge import MergeError
    from ..merge.export import export_base, export_merged
    from ..merge.export_gguf import export_gguf
    from ..train import TrainError, TrainSpec
    from ..train.model import resolve_base_model

    work, _ = _node_folder(payload.get("agent"))
    cache = work / "cache"
    work.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="export-", dir=work))
    try:
        model = payload["model"]
        model_dir = materialise(cache / "models", model["key"], model["files"], _fetch)
        base_path = model_dir / model["entry"] if model.get("entry") else model_dir
        trust = bool(payload.get("trust_remote_code"))
        # A .gguf base is dequantised once per node (cached by its hash), as training does.
        base_dir = resolve_base_model(TrainSpec(base_model=str(base_path),
                                                trust_remote_code=trust), cache_dir=cache)
        fmt = payload["format"]
        out = root / "out"
        if fmt == "base":
            export_base(base_dir, out)
        else:
            a = payload["adapter"]
            adapter_dir = materialise(cache / "adapters", a["key"], a["files"], _fetch)
            if fmt == "merged":
                export_merged(adapter_dir, base_dir, out, base_id=payload["base_id"],
                              trust_remote_code=trust)
            elif fmt == "gguf":
                base_config = _json.loads((base_dir / "config.json").read_text())
                base_gguf = model["entry"] or f"{payload['base_id'].rsplit('/', 1)[-1]}.gguf"
                export_gguf(adapter_dir, base_config, out, base_gguf=base_gguf,
                            adapter_id=a["id"])
            else:
                return _failed("invalid_format", f"unknown export format {fmt!r}")
        return {"status": "succeeded", "files": read_folder(out)}
    except MergeError as exc:
        return _failed("invalid_export", _relabel(_relabel(str(exc), root), cache))
    except TrainError as exc:
        return _failed(exc.code, _relabel(exc.message, cache), retryable=exc.retryable)
    except Exception as exc:
        return _failed("internal_error", _relabel(_relabel(f"{type(exc).__name__}: {exc}", root),
                                                  cache), retryable=True, with_traceback=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# max_retries=0: the head's queue decides about retries (it knows the attempt count).
merge_task = ray.remote(num_cpus=1, max_retries=0)(run_merge)
evaluate_task = ray.remote(num_cpus=1, max_retries=0)(run_evaluation)
export_task = ray.remote(num_cpus=1, max_retries=0)(run_export)
