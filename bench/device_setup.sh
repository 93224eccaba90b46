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

before=$($PY -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)')
if ! $PY -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(n) is None for n in
        ("bitsandbytes", "datasets", "pydantic", "liger_kernel", "trl", "unsloth", "lorapool")))'; then
    ls .wheels/*.whl >/dev/null  # fails clearly when the wheels were not carried
    $PY -m pip install -q --no-deps --no-index --no-compile --no-cache-dir .wheels/*.whl
    # lorapool itself, editable, from this working tree; setuptools and wheel are on the image,
    # so no build isolation (it would try to download them).
    $PY -m pip install -q --no-deps --no-index --no-build-isolation --no-cache-dir -e .
fi
after=$($PY -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)')
if [ "$before" != "$after" ]; then
    echo "device_setup: torch/transformers/peft changed: $before -> $after" >&2
    exit 1
fi

$PY - <<'EOF'
import importlib, torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
for name in ("triton", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
             "pydantic", "liger_kernel", "trl", "unsloth_zoo", "lorapool"):
    try:
        mod = importlib.import_module(name)
        version = getattr(mod, "__version__", None)
        if version is None:
            from importlib.metadata import version as dist_version
            version = dist_version(name.replace("_", "-"))
        print(f"  {name:<14}{version}")
    except Exception as exc:  # report, do not stop: the bench says per runner what is missing
        print(f"  {name:<14}NOT IMPORTABLE: {type(exc).__name__}: {exc}")
EOF
