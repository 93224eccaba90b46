"""A GPU's memory as the driver sees it, read through NVML without opening a CUDA context.

`torch.cuda.mem_get_info` creates the calling process's CUDA context on that GPU (0.3-0.8 GiB
of the card, held until the process exits). A node agent that asked the driver that way would
keep that much of a donor's card for as long as the node is in the pool, and a split job's
planner would pay it on every GPU it looked at. NVML (`nvidia-ml-py`) answers the same question
from the driver without a context.

NVML numbers GPUs in PCI bus order; CUDA, by default, fastest first, and only those in
`CUDA_VISIBLE_DEVICES`. A CUDA ordinal is therefore matched to its NVML device by UUID (which
`torch.cuda.get_device_properties` reads without a context), never by position.

    driver_memory(0)      # (free, total) bytes of cuda:0, or None where NVML cannot say
    gpu_memory(0)         # the same, falling back to torch (and its context) without NVML
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

log = logging.getLogger(__name__)

_init_lock = threading.Lock()
_state: dict[str, Any] = {"nvml": None, "failed": False}


def nvml_module() -> Any:
    """The initialised `pynvml` module, or None where it is missing or there is no driver."""
    with _init_lock:
        if _state["nvml"] is not None or _state["failed"]:
            return _state["nvml"]
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - no package, no driver: fall back
            log.debug("NVML unavailable: %s", exc)
            _state["failed"] = True
            return None
        _state["nvml"] = pynvml
        return pynvml


def cuda_uuid(gpu_index: int) -> Optional[str]:
    """The NVML form ("GPU-…") of the UUID of CUDA device `gpu_index` as this process numbers
    it, or None without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        uuid = str(torch.cuda.get_device_properties(gpu_index).uuid)
    except Exception:  # noqa: BLE001 - a broken driver: no answer
        return None
    # MIG instances already carry their "MIG-" prefix; a whole GPU's UUID comes bare.
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def nvml_handle(gpu_index: int = 0) -> Any:
    """(pynvml, the NVML handle of CUDA device `gpu_index`), or None where NVML is missing or
    does not list the device by that UUID."""
    nvml = nvml_module()
    uuid = cuda_uuid(gpu_index) if nvml is not None else None
    if uuid is None:
        return None
    try:
        return nvml, nvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception as exc:  # noqa: BLE001 - e.g. a MIG slice NVML does not list by UUID
        log.debug("NVML does not list %s: %s", uuid, exc)
        return None


def driver_memory(gpu_index: int = 0) -> Optional[tuple[int, int]]:
    """(free, total) bytes of CUDA device `gpu_index` from NVML, or None where NVML is missing
    or cannot find the device (the caller then asks torch)."""
    found = nvml_handle(gpu_index)
    if found is None:
        return None
    nvml, handle = found
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception as exc:  # noqa: BLE001
        log.debug("NVML has no memory reading for cuda:%d: %s", gpu_index, exc)
        return None
    return int(info.free), int(info.total)


def gpu_memory(gpu_index: int = 0) -> tuple[int, int]:
    """(free, total) bytes of CUDA device `gpu_index`: NVML where it answers, else
    `torch.cuda.mem_get_info` (which opens this process's CUDA context on that GPU)."""
    reading = driver_memory(gpu_index)
    if reading is not None:
        return reading
    import torch

    free, total = torch.cuda.mem_get_info(gpu_index)
    return int(free), int(total)
