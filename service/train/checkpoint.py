"""Training checkpoints: everything needed to continue a run elsewhere, without pickle.

A checkpoint folder (`output_dir/checkpoints/step-000010/`) holds

- `adapter_config.json` + `adapter_model.safetensors`: the LoRA weights (a loadable PEFT adapter);
- `optimizer.safetensors` + `optimizer.json`: the optimizer's tensors and the rest of its state;
- `scheduler.json`: the LR scheduler's state;
- `rng.safetensors` + `rng.json`: torch (CPU and every CUDA device), python `random`, numpy;
- `trainer_state.json`: the run's `RunState` (runstate.py) as JSON: step, data position (epoch,
  index in the epoch's shuffled order), micro-batch size and accumulation in use, running
  metrics, the spec, the base model hash and the fp16 loss scaler's state.

Tensors are saved on the CPU and moved to the parameters' device on load, so a checkpoint written
on a GPU resumes on the CPU and back. Folders are written under a temporary name and renamed into
place (`atomic_dir`), so a crash mid-write never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import TrainError
from .runstate import FORMAT_VERSION, RunState

__all__ = ["FORMAT_VERSION", "Checkpoint", "RunState", "TrainerState", "atomic_dir",
           "checkpoint_name", "load_checkpoint", "save_checkpoint", "prune_checkpoints"]

STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


# -- atomic folders -------------------------------------------------------------------------------


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on success it becomes `dest` by rename.

    An existing `dest` is replaced (moved aside first: a rename cannot overwrite a non-empty
    folder). On an exception the temporary folder is removed and `dest` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            trash = dest.parent / f".old-{dest.name}-{uuid.uuid4().hex[:8]}"
            os.replace(dest, trash)
            os.replace(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- nested state <-> (JSON, tensors) ------------------------------------------------------------


def encode_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """A JSON-able copy of `obj` with every tensor moved into `tensors` (CPU, contiguous).

    Keeps what JSON would lose: tuples, non-string dict keys (optimizer param ids are ints),
    numpy arrays (numpy's RNG state) and non-finite floats.
    """
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, prefix) for k, v in obj.items()}
        return {"__items__": [[encode_state(k, tensors, prefix), encode_state(v, tensors, prefix)]
                              for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, prefix) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__}")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode_state(k, tensors): decode_state(v, tensors) for k, v in obj["__items__"]}
    if "__float__" in obj:
        return float(obj["__float__"])
    return {k: decode_state(v, tensors) for k, v in obj.items()}


def save_state(folder: Path, stem: str, obj: Any) -> None:
    """Write `obj` as `<stem>.json` (+ `<stem>.safetensors` when it holds tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(obj, tensors)
    (folder / f"{stem}.json").write_text(json.dumps(encoded))
    if tensors:
        save_file(tensors, str(folder / f"{stem}.safetensors"))


def load_state(folder: Path, stem: str) -> Any:
    tensor_file = folder / f"{stem}.safetensors"
    tensors = load_file(str(tensor_file), device="cpu") if tensor_file.exists() else {}
    return decode_state(json.loads((folder / f"{stem}.json").read_text()), tensors)


# -- RNG ------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore RNG states; CUDA states only where this machine has as many GPUs (a checkpoint
    from a GPU resumes on the CPU with the CPU generators alone)."""
    random.setstate(_to_tuples(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def _to_tuples(obj: Any) -> Any:
    return tuple(_to_tuples(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


# -- optimizer / scheduler ----------------------------------------------------------------------


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a decoded optimizer state; JSON turned hyper-parameter tuples (betas) into lists,
    so take each group's tuple-typed values back to tuples before loading."""
    for saved, live in zip(state["param_groups"], optimizer.param_groups):
        for k, v in live.items():
            if isinstance(v, tuple) and isinstance(saved.get(k), list):
                saved[k] = tuple(saved[k])
    optimizer.load_state_dict(state)


# -- the checkpoint as a whole -------------------------------------------------------------------


# Kept for callers of the old name: the checkpointed state is the run's own state.
TrainerState = RunState


@dataclass
class Checkpoint:
    """A checkpoint read back from disk (tensors on the CPU)."""

    path: Path
    state: RunState
    adapter_weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def save_adapter_weights(model, folder: Path) -> None:
    """`model.save_pretrained(folder)` (peft, safetensors) with the trainable tensors copied to
    the host first, one at a time. peft clones tensors that share a storage before it writes
    (safetensors refuses aliases), and the packed tensors of fast/flat_params.py all share
    one: left to peft, every save would copy the whole adapter on the card."""
    from .model import trainable_parameters

    state = model.state_dict()
    for name, p in trainable_parameters(model).items():
        state[name] = p.detach().to("cpu", copy=True)
    model.save_pretrained(folder, safe_serialization=True, state_dict=state)


def save_checkpoint(dest: str | Path, *, model, optimizer_state: dict[str, Any], scheduler,
                    state: RunState) -> Path:
    """Write a checkpoint of the run to `dest` atomically; returns `dest`. `optimizer_state`
    is the optimizer's state dict over the trainable tensors themselves, one per tensor in
    `trainable_parameters` order (fast/flat_params.py unpacks a packed one)."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        save_adapter_weights(model, tmp)
        save_state(tmp, "optimizer", optimizer_state)
        save_state(tmp, "scheduler", scheduler.state_dict())
        save_state(tmp, "rng", capture_rng())
        (tmp / STATE_FILE).write_text(json.dumps(state.to_json(), indent=2, default=str))
    return dest


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint`; a clear error when it is not one."""
    path = Path(path)
    missing = [n for n in (STATE_FILE, "adapter_model.safetensors", "optimizer.json",
                           "scheduler.json", "rng.json") if not (path / n).is_file()]
    if missing:
        raise TrainError(f"resume_from {path} is not a lorapool checkpoint (missing "
                         f"{', '.join(missing)})", code="invalid_checkpoint")
    try:
        state = RunState.from_json(json.loads((path / STATE_FILE).read_text()))
    except ValueError as exc:  # includes a JSON syntax error
        raise TrainError(f"checkpoint {path} has an unreadable {STATE_FILE}: {exc}",
                         code="invalid_checkpoint") from exc
    return Checkpoint(
        path=path,
        state=state,
        adapter_weights=load_file(str(path / "adapter_model.safetensors"), device="cpu"),
        optimizer=load_state(path, "optimizer"),
        scheduler=load_state(path, "scheduler"),
        rng=load_state(path, "rng"),
    )


def prune_checkpoints(folder: str | Path, keep_last: int | None) -> None:
    """Delete all but the newest `keep_last` step folders (they have already been reported)."""
    if not keep_last:
        return
    steps = sorted(p for p in Path(folder).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
