"""No lorapool process reaches the Hugging Face Hub for compute kernels (service/hub_guard.py).

Each case runs a fresh interpreter: what matters is what happens when bitsandbytes is first
imported in a process, and the guard patches process-wide state. An audit hook records every
outward name lookup and connection (tests/support/outward.py); on a CPU with AVX512-BF16 (this
machine's kind) bitsandbytes' import looks up huggingface.co without the guard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("kernels", reason="the `kernels` package (a transformers dependency) is absent")

PROBE = r"""
import json
FIRST
import lorapool.service
import bitsandbytes, kernels
try:
    kernels.get_kernel("kernels-community/quantization-bitsandbytes", version=1)
    refused = ""
except Exception as exc:
    refused = f"{type(exc).__name__}: {exc}"
try:
    has = kernels.has_kernel("kernels-community/quantization-bitsandbytes")
except Exception as exc:
    has = type(exc).__name__
print(json.dumps({"refused": refused, "has_kernel": has,
                  "local_loader_kept": not hasattr(kernels.get_local_kernel, "_lorapool_refuses_hub")}))
"""


def _probe(tmp_path: Path, first: str = "", **env: str) -> dict:
    from tests.support.outward import attempts, install

    install(tmp_path / "audit", tmp_path / "outward")
    code = PROBE.replace("FIRST", first)
    # Online as a user's machine is (the suite runs offline): the guard must not rely on it.
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("LORAPOOL_ALLOW_HUB_KERNELS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    full_env.update(env, PYTHONPATH=str(tmp_path / "audit"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=full_env)
    assert out.returncode == 0, out.stderr[-2000:]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr,
            "outward": attempts(tmp_path / "outward")}


def test_importing_bitsandbytes_reaches_no_hub_and_hub_loaders_refuse(tmp_path):
    r = _probe(tmp_path)
    assert r["outward"] == [], r["outward"]
    assert r["refused"].startswith("HubKernelRefused"), r["refused"]
    assert "LORAPOOL_ALLOW_HUB_KERNELS=1" in r["refused"]
    assert r["local_loader_kept"]
    assert r["has_kernel"] is False  # answered here, without asking the Hub
    # bitsandbytes' own warning about the failed fetch is not shown to users.
    assert "gemm_4bit_forward" not in r["stderr"]


def test_a_kernels_module_imported_before_lorapool_is_patched_too(tmp_path):
    r = _probe(tmp_path, first="import kernels")
    assert r["refused"].startswith("HubKernelRefused"), r["refused"]


def test_an_admin_can_allow_hub_kernels(tmp_path):
    r = _probe(tmp_path, LORAPOOL_ALLOW_HUB_KERNELS="1",
               HF_HUB_OFFLINE="1")  # offline: the allowed loader must still not reach out here
    assert not r["refused"].startswith("HubKernelRefused"), r["refused"]
