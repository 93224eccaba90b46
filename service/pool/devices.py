"""What GPU a node has and how much of its memory is free right now.

Free memory is what the driver reports, so other users' processes count against it. It is read
through NVML (train/nvml.py) and the speed calibration runs in a child process, so the agent
that calls these never holds a CUDA context of its own on the donor's card. A node without CUDA
reports itself as a CPU device: its RAM (total, and available now) and its cores, which bound
how many jobs it trains at once (`cpu_slots`). Tests and CPU-only donors describe a simulated
GPU instead (`SimulatedGPU`), which the whole pool then treats exactly like a real one:
placement, memory accounting and reclaiming all run; only the arithmetic happens on the CPU.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict

from ..train.nvml import gpu_memory
from ..train.spec import DeviceInfo


class SimulatedGPU(BaseModel):
    """A GPU a test (or a CPU-only donor) tells the NodeAgent it has."""

    model_config = ConfigDict(extra="forbid")

    name: str
    total_memory: int
    free_memory: Optional[int] = None  # defaults to total
    compute_capability: tuple[int, int] = (8, 6)
    speed_tflops: Optional[float] = None  # what the calibration would measure; None: unknown
    # The CUDA context a training process would take on it (what a real node measures,
    # DeviceInfo.context_bytes); None: the estimate's 600 MiB constant. A test of the split
    # over several simulated GPUs sets it small, as each GPU of a split pays its own context,
    # which would dwarf any model small enough to train on a CPU.
    context_bytes: Optional[int] = None


def detect_device(
    simulate: Optional[SimulatedGPU] = None,
    *,
    gpu_index: int = 0,
    memory_cap: Optional[int] = None,
    cpu_memory: Optional[int] = None,
) -> DeviceInfo:
    """The device this node offers, with free memory capped by the donor's `memory_cap`."""
    if simulate is not None:
        free = simulate.total_memory if simulate.free_memory is None else simulate.free_memory
        info = DeviceInfo(
            kind="cuda",
            name=simulate.name,
            total_memory=simulate.total_memory,
            free_memory=free,
            compute_capability=simulate.compute_capability,
            context_bytes=simulate.context_bytes,
        )
    else:
        info = _detect_real(gpu_index, cpu_memory)
    if memory_cap is not None:
        info.total_memory = min(info.total_memory, memory_cap)
        if info.free_memory is not None:
            info.free_memory = min(info.free_memory, memory_cap)
    return info


def _detect_real(gpu_index: int, cpu_memory: Optional[int]) -> DeviceInfo:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(gpu_index)  # no context needed
            free, total = gpu_memory(gpu_index)
            return DeviceInfo(
                kind="cuda",
                name=props.name,
                total_memory=total,
                free_memory=free,
                compute_capability=(props.major, props.minor),
            )
    except Exception:  # a broken driver must not keep a donor out of the pool as a CPU node
        pass
    # A CPU node: its RAM. Total is what the donor offers (`cpu_memory`) or the machine's RAM;
    # free is what the kernel says is available now (other programs count), never above total.
    total_ram, available = system_memory()
    total = cpu_memory if cpu_memory is not None else total_ram
    return DeviceInfo(kind="cpu", name="cpu", total_memory=total,
                      free_memory=min(total, available), compute_capability=(0, 0))


def system_memory() -> tuple[int, int]:
    """(total, available) bytes of this machine's RAM."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except Exception:
        import os

        page = os.sysconf("SC_PAGE_SIZE")
        return (int(page * os.sysconf("SC_PHYS_PAGES")),
                int(page * os.sysconf("SC_AVPHYS_PAGES")))


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cpu_slots(cores: int, threads_per_job: Optional[int], configured: Optional[int]) -> int:
    """How many jobs a CPU node trains at once: `configured`, else one per `threads_per_job`
    cores (one per core when a job uses Ray's default single thread), at least one."""
    if configured is not None:
        return max(1, configured)
    return max(1, cores // max(1, threads_per_job or 1))


def measure_speed(kind: str = "cuda", *, gpu_index: int = 0, size: int = 1024,
                  repeats: int = 3) -> float | None:
    """Dense matmul speed of this node in TFLOP/s: bf16 on a GPU, fp32 on a CPU (what a QLoRA
    step runs on each). A short calibration (a few `size`³ matmuls, tens of milliseconds on a
    GPU), taken as the best of `repeats` timed runs after a warm-up; None when torch is
    missing or the device fails."""
    import time

    try:
        import torch

        if kind == "cuda":
            if not torch.cuda.is_available():
                return None
            dev, dtype = torch.device("cuda", gpu_index), torch.bfloat16
        else:
            dev, dtype = torch.device("cpu"), torch.float32
            size = min(size, 512)  # a CPU does ~0.1-1 TFLOP/s: keep the probe under ~0.1 s
        a = torch.randn(size, size, device=dev, dtype=dtype)
        b = torch.randn(size, size, device=dev, dtype=dtype)
        best = float("inf")
        for i in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i:  # the first run warms up kernels and caches
                best = min(best, time.perf_counter() - t0)
        return 4 * 2.0 * size**3 / best / 1e12
    except Exception:  # a broken driver must not keep a donor out of the pool
        return None


SPEED_TAG = "@@SPEED "
SPEED_PROBE_TIMEOUT_S = 120.0


def measure_speed_isolated(kind: str = "cuda", *, gpu_index: int = 0,
                           timeout_s: float = SPEED_PROBE_TIMEOUT_S) -> float | None:
    """`measure_speed` in a child process, so the caller never opens a CUDA context (the
    child's goes when it exits); None when the child fails or times out. A CPU measurement
    holds nothing and runs in this process."""
    if kind != "cuda":
        return measure_speed(kind, gpu_index=gpu_index)
    import json
    import subprocess
    import sys

    try:
        proc = subprocess.run(
            [sys.executable, "-m", __spec__.name if __spec__ else __name__, "--speed",
             "--gpu", str(gpu_index)],
            capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in proc.stdout.splitlines():
        if line.startswith(SPEED_TAG):
            value = json.loads(line[len(SPEED_TAG):])
            return float(value) if value is not None else None
    return None


def main(argv: list[str] | None = None) -> int:
    """`python -m lorapool.service.pool.devices --speed --gpu N`: the child of
    `measure_speed_isolated` (prints its reading after SPEED_TAG)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description="One calibration matmul of this node's GPU.")
    ap.add_argument("--speed", action="store_true", help="measure TFLOP/s and print it")
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--kind", choices=("cuda", "cpu"), default="cuda")
    args = ap.parse_args(argv)
    if not args.speed:
        ap.error("nothing to do: pass --speed")
    print(SPEED_TAG + json.dumps(measure_speed(args.kind, gpu_index=args.gpu)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
