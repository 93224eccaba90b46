"""How much GPU memory a training process's CUDA context takes on this node, measured once.

`estimate_memory` adds the CUDA context (driver state, cuBLAS/cuDNN workspaces, the kernels a
run loads) to what PyTorch allocates. It depends on the card, the driver and the CUDA version,
and it grows as kernels load lazily: 0.60 GiB was measured at the end of a run on an H100,
0.82 GiB on an H200 under CUDA 13, and consumer cards with lazy loading take less. A constant
under-predicts on one card (a job placed there can run out of memory) and wastes memory on
another, so a node measures it: a child process trains two steps of a tiny model through the
same trainer and fast path as a real job (so it loads the same kernel families: cuBLAS,
bitsandbytes, Triton/Liger, SDPA or flex attention) and reports how far the driver's free
memory fell beyond what PyTorch reserved. The parent reads free memory just before starting
the child, so what other processes hold (the owner's desktop) is not counted, as long as it
does not change during the probe. Both read the driver through NVML where it is installed
(nvml.py), so the parent, a node agent, opens no CUDA context of its own.

    context = free before the child  -  free at the child's end  -  child's reserved

    measure_context_bytes(gpu_index)   # bytes, or None on a CPU node or when the probe fails
    python -m lorapool.service.train.context_probe --gpu 0        # prints the child's JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .nvml import gpu_memory

log = logging.getLogger(__name__)

# Outside this range a reading is noise (another process freed or took memory meanwhile).
MIN_CONTEXT_BYTES = 64 * 1024**2
MAX_CONTEXT_BYTES = 4 * 1024**3
PROBE_TIMEOUT_S = 240.0
RESULT_TAG = "@@CONTEXT "
# The child is started as `python -m` this module: its importable name, also when this file
# itself runs as __main__.
_MODULE = __spec__.name if __spec__ is not None else __name__


def context_from(free_before: int, free_after: int, reserved_after: int) -> Optional[int]:
    """The child's context from the three readings, or None when they cannot be one."""
    context = free_before - free_after - reserved_after
    if not MIN_CONTEXT_BYTES <= context <= MAX_CONTEXT_BYTES:
        return None
    return int(context)


def measure_context_bytes(gpu_index: int = 0, *,
                          timeout_s: float = PROBE_TIMEOUT_S) -> Optional[int]:
    """Bytes a training process's CUDA context takes on GPU `gpu_index`; None when there is no
    CUDA GPU or the probe fails (the estimate then keeps its constant)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free_before = gpu_memory(gpu_index)[0]  # NVML: no context of our own to count
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": _visible(gpu_index),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, "-m", _MODULE, "--child"], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        reading = _parse(proc.stdout)
        if reading is None:
            log.warning("CUDA context probe failed (rc %s): %s", proc.returncode,
                        proc.stderr.strip()[-500:])
            return None
        return context_from(free_before, reading["free"], reading["reserved"])
    except Exception as exc:  # noqa: BLE001 - a failed probe must not keep a node out
        log.warning("CUDA context probe failed: %s", exc)
        return None


def _visible(gpu_index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry for `gpu_index` as this process numbers its GPUs."""
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    if current:
        ids = [x.strip() for x in current.split(",") if x.strip()]
        if 0 <= gpu_index < len(ids):
            return ids[gpu_index]
    return str(gpu_index)


def _parse(stdout: str) -> Optional[dict]:
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return None


def _child() -> dict:
    """Two fast-path steps of a tiny model on cuda:0, then the driver's and PyTorch's readings."""
    import torch

    from .loop import train
    from .spec import LoraSpec, TrainSpec
    from .tiny import make_tiny_llama

    with tempfile.TemporaryDirectory(prefix="lorapool-context-") as tmp:
        root = Path(tmp)
        model = make_tiny_llama(root / "model")
        rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                              {"role": "assistant", "content": "answer"}]} for i in range(8)]
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = TrainSpec(base_model=str(model), device="cuda", max_seq_len=64, batch_size=4,
                         micro_batch_size=4, max_steps=2, lora=LoraSpec(r=8, alpha=16,
                                                                         dropout=0.0),
                         fast="auto", seed=0)
        train(spec, data, root / "out", cache_dir=root / "cache")
        torch.cuda.synchronize()
        free, _ = gpu_memory(0)  # the same reader as the parent's, so the two readings agree
        return {"free": int(free), "reserved": int(torch.cuda.memory_reserved()),
                "device": torch.cuda.get_device_name(0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gpu", type=int, default=0, help="the GPU to measure (default 0)")
    args = ap.parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(_child()), flush=True)
        return 0
    context = measure_context_bytes(args.gpu)
    print(json.dumps({"gpu": args.gpu, "context_bytes": context}))
    return 0 if context is not None else 1


if __name__ == "__main__":
    sys.exit(main())
