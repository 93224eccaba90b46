"""Fill `.wheels/` with what the GPU machine lacks for the trainer benchmarks, then trim it.

The device machine has torch/transformers/peft but no bitsandbytes, datasets, pydantic,
liger-kernel or Unsloth, and no internet; a call carries at most 64 MiB. This downloads the
pinned wheels for CPython 3.12 on manylinux x86_64 (`pip download --no-deps`), then repacks two
of them smaller:

- bitsandbytes: keeps only `libbitsandbytes_cuda130.so` (torch there is cu130, and bitsandbytes
  loads the library named after `torch.version.cuda`) and the CPU one; drops the other CUDA,
  ROCm and XPU builds (~150 MB unpacked);
- unsloth: drops the top-level `studio/` folder (its web UI, ~82 MB; not imported by
  `from unsloth import FastLanguageModel`).

A repacked wheel keeps its file name and gets a rewritten RECORD (sha256 and size of every file
left), so pip installs it as usual. `.wheels/` is git-ignored (.git/info/exclude) and never
committed. Check the result with `python bench/check_wheels.py .wheels`.

    python bench/make_wheels.py [--dest .wheels]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

# name==version: the versions the project's CPU venv is tested with where it has them, else
# the newest that fits the device's torch 2.11 / transformers 5.17.
PINS = [
    # lorapool's own runtime needs (client: pydantic; trainer: bitsandbytes, datasets)
    "pydantic==2.13.4", "pydantic-core==2.46.4", "annotated-types==0.7.0",
    "typing-inspection==0.4.2",
    "bitsandbytes==0.50.2",
    "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",
    "nvidia-ml-py==13.615.71",  # the agent's context-free GPU reading (train/nvml.py)
    # the comparison runners
    "liger-kernel==0.8.5",
    "unsloth==2026.10.9", "unsloth-zoo==2026.10.9",
    "trl==1.15.0", "torchao==0.18.0", "cut-cross-entropy==25.1.1", "msgspec==0.22.0",
    "tyro==1.0.16", "docstring-parser==0.17.0", "typeguard==4.4.4", "shtab==1.7.2",
]

PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_28_x86_64", "manylinux1_x86_64"]

BNB_KEEP = re.compile(r"libbitsandbytes_(cuda130|cpu)\.so$")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(wheel: Path, drop: Callable[[str], bool]) -> tuple[int, int]:
    """Rewrite `wheel` in place without the members `drop` selects; returns (before, after) bytes."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in src.infolist():
            name = info.filename
            if name == record or name.endswith("/") or drop(name):
                continue
            data = src.read(name)
            out = zipfile.ZipInfo(name, date_time=info.date_time)
            out.external_attr = info.external_attr  # keeps the .so files' exec bits
            out.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(out, data, compresslevel=9)
            lines.append(_record_line(name, data))
        lines.append(f"{record},,")
        out = zipfile.ZipInfo(record, date_time=(2026, 1, 1, 0, 0, 0))
        out.compress_type = zipfile.ZIP_DEFLATED
        dst.writestr(out, "\n".join(lines) + "\n")
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def _is_other_bnb_lib(name: str) -> bool:
    return bool(re.search(r"libbitsandbytes_\w+\.(so|dll|dylib)$", name)) and not BNB_KEEP.search(name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path(".wheels"))
    args = ap.parse_args(argv)
    args.dest.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", tmp]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        subprocess.run(cmd + PINS, check=True)
        for w in Path(tmp).glob("*.whl"):
            w.replace(args.dest / w.name)
    for w in args.dest.glob("bitsandbytes-*.whl"):
        print("bitsandbytes: %d -> %d bytes" % repack(w, _is_other_bnb_lib))
    for w in args.dest.glob("unsloth-*.whl"):
        print("unsloth: %d -> %d bytes" % repack(w, lambda n: n.startswith("studio/")))
    total = sum(w.stat().st_size for w in args.dest.glob("*.whl"))
    print(f"{args.dest}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
