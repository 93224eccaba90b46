"""The CUDA caching allocator's settings for a training process: expandable segments.

PyTorch's caching allocator keeps the blocks a run frees for reuse. With fixed-size segments a
training step's tensors of ever-changing sizes (packed rows, the loss' chunks, the recompute's
transients) leave free blocks that the next request does not fit: on the calibration grid
(bench/gpu_memory.py) the driver saw 0.05 to 3.4 GiB more than the run ever had allocated, and
how much more depended on the order of frees, not on the job. That gap is memory a small card
does not have, and an estimate cannot predict it. With expandable segments the allocator maps
pages into one growing virtual range per stream instead, so what it holds follows what is
allocated (plus page rounding): the estimate models the allocated peak, which it predicts to
a few percent, and a job needs less of the card.

The setting is process-wide and applies to segments created after it, so `train()` turns it on
before the model is loaded. A user who set `PYTORCH_CUDA_ALLOC_CONF` / `PYTORCH_ALLOC_CONF`
with their own `expandable_segments` choice keeps it; `LORAPOOL_EXPANDABLE_SEGMENTS=0` opts out.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

_USER_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _set_allocator_settings(conf: str) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # torch < 2.9 names it under torch.cuda.memory
        setter = torch.cuda.memory._set_allocator_settings
    setter(conf)


def use_expandable_segments(device: torch.device) -> str:
    """Turn expandable segments on for this process's CUDA allocator (where nobody chose
    otherwise); what was done, for the run's events ("" off CUDA: there is no such allocator)."""
    if device.type != "cuda":
        return ""
    if os.environ.get("LORAPOOL_EXPANDABLE_SEGMENTS", "1") == "0":
        return "default allocator (LORAPOOL_EXPANDABLE_SEGMENTS=0)"
    for var in _USER_CONF_VARS:
        if "expandable_segments" in os.environ.get(var, ""):
            return f"allocator as {var} sets it"
    try:
        _set_allocator_settings("expandable_segments:True")
    except Exception as exc:  # noqa: BLE001 - an old torch or a platform without VMM support
        log.warning("could not turn on expandable segments (%s); default allocator", exc)
        return f"default allocator (expandable segments unavailable: {exc})"[:200]
    return "expandable segments"
