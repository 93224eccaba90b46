#!/usr/bin/env bash
# Prepare the GPU (device) machine for bench/train_speed.py and bench/gpu_memory.py.
#
# That machine has torch 2.11 cu130, transformers, peft, accelerate, ... but no bitsandbytes,
# datasets, pydantic, liger-kernel or Unsloth, and no internet. The wheels travel in .wheels/
# (made here by bench/make_wheels.py, checked by bench/check_wheels.py, git-ignored; name it in
# the call's `carry`). Everything installs with --no-deps --no-index so pip never touches the
# image's torch/transformers/peft; this script fails if their versions changed anyway.
#
#   bash bench/device_setup.sh
#
# Idempotent: a second run on a warm machine reinstalls nothing. The exports below matter only
# when sourced; the bench scripts set the same variables themselves.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

pinned() {  # the image's own versions, read from metadata (no imports: fast)
    $PY -c 'from importlib.metadata import PackageNotFoundError, version
def v(d):
    try:
        return version(d)
    except PackageNotFoundError:
        return "none"
print(*(v(d) for d in ("torch", "transformers", "peft", "accelerate", "triton")))'
}
before=$(pinned)
if ! $PY -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(n) is None for n in
        ("bitsandbytes", "datasets", "pydantic", "liger_kernel", "trl", "unsloth", "lorapool")))'; then
    ls .wheels/*.whl >/dev/null  # fails clearly when the wheels were not carried
    $PY -m pip install -q --no-deps --no-index --no-compile --no-cache-dir .wheels/*.whl
    # lorapool itself, editable, from this working tree; setuptools and wheel are on the image,
    # so no build isolation (it would try to download them).
    $PY -m pip install -q --no-deps --no-index --no-build-isolation --no-cache-dir -e .
fi
after=$(pinned)
if [ "$before" != "$after" ]; then
    echo "device_setup: torch/transformers/peft/accelerate/triton changed: $before -> $after" >&2
    exit 1
fi

$PY - <<'PYEOF'
import importlib.util
from importlib.metadata import PackageNotFoundError, version

import torch

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
# Versions from the installed metadata: importing unsloth or trl here would cost seconds.
for dist, module in (("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"),
                     ("accelerate", "accelerate"), ("bitsandbytes", "bitsandbytes"),
                     ("datasets", "datasets"), ("pydantic", "pydantic"),
                     ("liger-kernel", "liger_kernel"), ("trl", "trl"), ("unsloth", "unsloth"),
                     ("unsloth-zoo", "unsloth_zoo"), ("lorapool", "lorapool")):
    try:
        found = importlib.util.find_spec(module) is not None
        print(f"  {dist:<14}{version(dist)}{'' if found else '  (NOT IMPORTABLE)'}")
    except PackageNotFoundError:
        print(f"  {dist:<14}NOT INSTALLED")
# Fail here, not in the middle of the benchmark, when the trainer cannot even be imported.
import bitsandbytes  # noqa: E402,F401
import lorapool.service.train.loop  # noqa: E402,F401

print("bitsandbytes and lorapool.service.train.loop import")
PYEOF
