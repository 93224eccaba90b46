"""Reading a GPU's memory through NVML: the CUDA ordinal is matched to NVML's device by UUID,
never by position, and without NVML the reading falls back to torch.

This machine has neither a GPU nor an NVIDIA driver, so the CPU tests stand a small fake
`pynvml` module and fake CUDA device properties in for them; the GPU test at the end checks the
real thing: a process that reads its card this way holds no CUDA context on it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass

import pytest
import torch

from lorapool.service.train import nvml

GiB = 1024**3


@dataclass
class _Mem:
    free: int
    total: int


def _fake_pynvml(devices: dict[str, _Mem]) -> types.ModuleType:
    """NVML over `devices` (UUID -> memory), listed in its own (PCI) order."""
    mod = types.ModuleType("pynvml")
    mod.nvmlInit = lambda: None
    mod.nvmlDeviceGetHandleByUUID = lambda uuid: devices[uuid] if uuid in devices else (
        _ for _ in ()).throw(RuntimeError("NVML_ERROR_NOT_FOUND"))
    mod.nvmlDeviceGetMemoryInfo = lambda handle: handle
    return mod


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two CUDA devices whose CUDA order is the reverse of NVML's."""
    monkeypatch.setitem(nvml._state, "nvml", None)
    monkeypatch.setitem(nvml._state, "failed", False)
    in_nvml_order = {"GPU-aaaa": _Mem(free=1 * GiB, total=8 * GiB),
                     "GPU-bbbb": _Mem(free=20 * GiB, total=24 * GiB)}
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(in_nvml_order))
    cuda_order = ["bbbb", "aaaa"]  # CUDA numbers the faster card first
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=cuda_order[i]))
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda i=0: pytest.fail("torch asked: that opens a CUDA context"))
    return in_nvml_order


def test_each_cuda_ordinal_reads_its_own_card(fake_gpus):
    assert nvml.driver_memory(0) == (20 * GiB, 24 * GiB)
    assert nvml.driver_memory(1) == (1 * GiB, 8 * GiB)
    assert nvml.gpu_memory(1) == (1 * GiB, 8 * GiB)


def test_a_device_nvml_does_not_list_falls_back_to_torch(fake_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid="MIG-cccc"))
    assert nvml.driver_memory(0) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (3 * GiB, 4 * GiB))
    assert nvml.gpu_memory(0) == (3 * GiB, 4 * GiB)


def test_without_nvml_torch_answers(monkeypatch):
    monkeypatch.setitem(nvml._state, "nvml", None)
    monkeypatch.setitem(nvml._state, "failed", False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: not installed
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (5 * GiB, 6 * GiB))
    assert nvml.nvml_module() is None and nvml.driver_memory(0) is None
    assert nvml.gpu_memory(0) == (5 * GiB, 6 * GiB)


def test_no_cuda_means_no_reading_on_this_machine():
    # The real modules, no fakes: no GPU here, so no UUID and no NVML reading.
    assert nvml.cuda_uuid(0) is None
    assert nvml.driver_memory(0) is None


@pytest.mark.gpu
def test_reading_the_card_opens_no_cuda_context():
    pytest.importorskip("pynvml")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # A fresh process (this one may have CUDA up already) reads its card as the agent does,
    # then asks NVML which processes hold a context there.
    code = textwrap.dedent("""
        import os, pynvml
        from lorapool.service.pool.devices import detect_device, measure_speed_isolated
        from lorapool.service.train.nvml import nvml_handle
        dev = detect_device(None, gpu_index=0)
        speed = measure_speed_isolated("cuda", gpu_index=0)
        nv, handle = nvml_handle(0)
        def holds():
            return os.getpid() in [p.pid for p in nv.nvmlDeviceGetComputeRunningProcesses(handle)]
        before = holds()
        import torch
        torch.zeros(1, device="cuda")  # now it does hold one: NVML must say so (the control)
        print(dev.kind, dev.total_memory, dev.free_memory, speed, before, holds())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    kind, total, free, speed, before, control = out[-6:]
    assert kind == "cuda" and int(total) > int(free) > 0
    assert float(speed) > 1.0  # TFLOP/s of a real GPU, measured by the child
    if control != "True":
        pytest.skip("NVML does not list this container's processes by its own pids")
    assert before == "False"
