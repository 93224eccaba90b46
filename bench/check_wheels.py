"""Check the wheels carried to the GPU machine (`.wheels/`) without installing them.

The device machine (Python 3.12, torch 2.11 cu130, transformers 5.17, no internet) lacks a few
packages the benchmarks need; `bench/device_setup.sh` installs them from `.wheels/` with
`pip install --no-deps --no-index`, so nothing checks their dependencies there. This script
does it here, where the wheels cannot be installed (other Python, CPU torch):

1. every wheel is a well-formed zip whose RECORD lists each file with the right sha256 and size
   (the repacked bitsandbytes wheel must pass this like any other), one version per project;
2. bitsandbytes carries native libraries for CUDA 13 only (and the CPU one);
3. every `Requires-Dist` that applies on linux/x86_64/CPython 3.12 is met by a carried wheel or
   by a package the device image has (KINDS.md's list), or is listed in `KNOWN_UNMET` with why;
4. the import closure of `unsloth` (what `from unsloth import FastLanguageModel` runs at module
   level, outside `try` blocks) and of the other roots reaches no module that is neither in the
   standard library, nor carried, nor on the device.

    python bench/check_wheels.py [.wheels]

Exit status 1 when a check fails. Pure Python: needs `packaging` only.
"""

from __future__ import annotations

import ast
import base64
import csv
import hashlib
import io
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path, PurePosixPath

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

# The device image's Python packages (KINDS.md, "Python packages already there", read
# 2026-11-17), with the versions the brief gives for the ones that matter here.
DEVICE_VERSIONS = {
    "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "peft": "0.21.0",
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "safetensors": "0.8.0",
    "tokenizers": "0.23.2", "numpy": "2.5.2", "sentencepiece": "0.2.2", "torchvision": "0.26.0",
}
DEVICE_PACKAGES = set(DEVICE_VERSIONS) | set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
""".split())

# Import names that differ from their distribution's name.
IMPORT_TO_DIST = {
    "PIL": "pillow", "yaml": "pyyaml", "google": "protobuf", "sklearn": "scikit-learn",
    "cv2": "opencv-python-headless", "dateutil": "python-dateutil", "jinja2": "jinja2",
    "huggingface_hub": "huggingface-hub", "typing_extensions": "typing-extensions",
    "pydantic_core": "pydantic-core", "annotated_types": "annotated-types",
    "typing_inspection": "typing-inspection", "liger_kernel": "liger-kernel",
    "unsloth_zoo": "unsloth-zoo", "unsloth_zoo_downloads": "unsloth-zoo",
    "unsloth_cli": "unsloth", "_multiprocess": "multiprocess", "pynvml": "nvidia-ml-py",
    "cut_cross_entropy": "cut-cross-entropy", "setuptools": "setuptools",
    "pkg_resources": "setuptools", "_distutils_hack": "setuptools",
}

# Declared requirements we deliberately do not carry, and why (checked by reading the code:
# none is imported outside a try block on the path `from unsloth import FastLanguageModel`).
KNOWN_UNMET = {
    "xformers": "optional: unsloth falls back to SDPA/flash when xformers is absent; a wheel "
                "is ~100 MB and must match torch 2.11 exactly",
    "diffusers": "only unsloth's diffusion models import it, lazily",
    "hf-transfer": "download speed-up only; HF_HUB_OFFLINE=1 downloads nothing",
    "tyro": "unsloth's CLI only", "json5": "unsloth studio only", "structlog": "studio only",
    "nest-asyncio": "studio only", "mlx": "Apple only",
    "datasets": "unsloth pins datasets<5; lorapool needs 5.x and unsloth's version check only warns",
    "trl": "see trl's own entry when carried",
    "certifi": "the image's certifi is older than unsloth's floor; only used for downloads",
}

ROOTS = ["unsloth", "liger_kernel.transformers", "bitsandbytes", "datasets", "pydantic"]


def _record_ok(zf: zipfile.ZipFile, name: str) -> list[str]:
    """Problems with a wheel's RECORD: files missing from it, or hashes/sizes that do not match."""
    problems = []
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        return [f"{name}: {len(records)} RECORD files"]
    listed = {}
    for row in csv.reader(io.StringIO(zf.read(records[0]).decode())):
        if row:
            listed[row[0]] = row[1:]
    for member in zf.namelist():
        if member.endswith("/"):
            continue
        if member not in listed:
            problems.append(f"{name}: {member} not in RECORD")
            continue
        digest, size = listed[member]
        if member == records[0]:
            continue
        data = zf.read(member)
        algo, _, want = digest.partition("=")
        got = base64.urlsafe_b64encode(hashlib.new(algo, data).digest()).rstrip(b"=").decode()
        if got != want or int(size) != len(data):
            problems.append(f"{name}: {member} hash/size mismatch")
    for member in set(listed) - set(zf.namelist()):
        problems.append(f"{name}: RECORD lists missing {member}")
    return problems


def _device_env() -> dict[str, str]:
    env = default_environment()
    env.update(python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix",
               implementation_name="cpython", platform_python_implementation="CPython")
    return env


class Imports(ast.NodeVisitor):
    """Module-level imports of one file, split into unconditional and guarded by `try`."""

    def __init__(self, module: str, is_pkg: bool) -> None:
        self.module, self.is_pkg = module, is_pkg
        self.hard: set[str] = set()
        self.soft: set[str] = set()
        self._try = 0

    def _base(self, level: int) -> str:
        parts = self.module.split(".")
        if not self.is_pkg:
            parts = parts[:-1]
        return ".".join(parts[: len(parts) - (level - 1)] if level > 1 else parts)

    def _add(self, name: str) -> None:
        (self.soft if self._try else self.hard).add(name)

    def visit_FunctionDef(self, node):  # bodies run when called, not at import
        return

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_Try(self, node):
        # Only a handler that catches a failed import makes the body's imports optional.
        names = {ast.unparse(h.type) if h.type is not None else "" for h in node.handlers}
        catches = any(re.search(r"^$|ImportError|ModuleNotFoundError|Exception", n)
                      for n in names)
        self._try += catches
        for stmt in node.body:
            self.visit(stmt)
        self._try -= catches
        self._try += 1  # an except clause is the fallback when the body failed
        for part in node.handlers:
            self.visit(part)
        self._try -= 1
        for part in (*node.orelse, *node.finalbody):
            self.visit(part)

    visit_TryStar = visit_Try

    def visit_If(self, node):
        # `if TYPE_CHECKING:`, `if config.POLARS_AVAILABLE:`, `if find_spec(...)`: guarded
        guarded = re.search(r"TYPE_CHECKING|AVAILABLE|available|HAS_|find_spec|version_info",
                            ast.unparse(node.test))
        self._try += bool(guarded)
        for stmt in node.body:
            self.visit(stmt)
        self._try -= bool(guarded)
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node):
        base = self._base(node.level) if node.level else ""
        mod = ".".join(p for p in (base, node.module or "") if p)
        self._add(mod)
        for alias in node.names:  # `from pkg import sub` may import a submodule
            self._add(f"{mod}.{alias.name}?")


def import_closure(sources: dict[str, tuple[str, bool]], roots: list[str],
                   seen: set[str] | None = None) -> dict[str, str]:
    """External top-level names reached from `roots` by unconditional imports -> first importer.

    `seen` collects the carried modules visited."""
    seen = set() if seen is None else seen
    external: dict[str, str] = {}
    stack = [(r, "<root>") for r in roots]
    while stack:
        mod, by = stack.pop()
        optional_sub = mod.endswith("?")
        mod = mod.rstrip("?")
        if mod in seen:
            continue
        if mod not in sources:
            top = mod.split(".")[0]
            if optional_sub or any(m.startswith(top + ".") or m == top for m in sources):
                continue  # an attribute, not a submodule, or a carried package's missing bit
            external.setdefault(top, by)
            continue
        seen.add(mod)
        parts = mod.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__
            stack.append((".".join(parts[:i]), by))
        text, is_pkg = sources[mod]
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        v = Imports(mod, is_pkg)
        v.visit(tree)
        stack.extend((m, mod) for m in v.hard)
    return external


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", type=Path, default=Path(".wheels"))
    ap.add_argument("--without", default="",
                    help="comma-separated projects to leave out (does the closure still hold?)")
    args = ap.parse_args(argv)
    folder = args.folder
    without = {canonicalize_name(n) for n in args.without.split(",") if n}
    wheels = [w for w in sorted(folder.glob("*.whl"))
              if canonicalize_name(parse_wheel_filename(w.name)[0]) not in without]
    if not wheels:
        print(f"no wheels in {folder}")
        return 1
    problems: list[str] = []
    carried: dict[str, Version] = {}
    sources: dict[str, tuple[str, bool]] = {}
    requires: list[tuple[str, str]] = []
    env = _device_env()
    total = 0
    for w in wheels:
        total += w.stat().st_size
        name, version, _, tags = parse_wheel_filename(w.name)
        if name in carried:
            problems.append(f"two versions of {name}")
        carried[name] = version
        if not any(t.interpreter in ("py3", "cp312", "py312")
                   or (t.abi == "abi3" and t.interpreter <= "cp312") for t in tags):
            problems.append(f"{w.name}: not for CPython 3.12")
        if not any(t.platform in ("any", "linux_x86_64") or
                   (t.platform.startswith("manylinux") and t.platform.endswith("x86_64"))
                   for t in tags):
            problems.append(f"{w.name}: not for linux x86_64")
        with zipfile.ZipFile(w) as zf:
            problems += _record_ok(zf, w.name)
            meta = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")][0]
            for req in Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []:
                requires.append((str(name), req))
            for n in zf.namelist():
                if n.endswith(".py") and ".dist-info/" not in n and ".data/" not in n:
                    p = PurePosixPath(n)
                    is_pkg = p.name == "__init__.py"
                    mod = ".".join(p.parent.parts if is_pkg else (*p.parent.parts, p.stem))
                    sources[mod] = (zf.read(n).decode("utf-8", "replace"), is_pkg)
            if name == "bitsandbytes":
                libs = [n for n in zf.namelist() if re.search(r"\.(so|dll|dylib)$", n)]
                print(f"bitsandbytes native libraries: {', '.join(PurePosixPath(n).name for n in libs)}")
                bad = [n for n in libs if not re.search(r"(cuda13\d|_cpu)\.so$", n)]
                if bad or not any("cuda130" in n for n in libs):
                    problems.append(f"bitsandbytes: libraries other than CUDA 13 / CPU: {bad}")
            if name == "unsloth" and any(n.startswith("studio/") for n in zf.namelist()):
                problems.append("unsloth: studio/ still inside")
        print(f"  {w.name}  {w.stat().st_size / 2**20:.1f} MiB")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB")

    for owner, text in requires:
        req = Requirement(text)
        if req.marker is not None:
            if "extra" in str(req.marker):
                continue
            if not req.marker.evaluate(env):
                continue
        dist = canonicalize_name(req.name)
        if dist in carried:
            if req.specifier and not req.specifier.contains(carried[dist], prereleases=True):
                note = KNOWN_UNMET.get(dist)
                line = f"{owner} wants {req}, carried {carried[dist]}"
                (print(f"  note: {line} ({note})") if note else problems.append(line))
            continue
        if dist in DEVICE_PACKAGES:
            have = DEVICE_VERSIONS.get(dist)
            if have and req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{owner} wants {req}, device has {have}")
            continue
        if dist in KNOWN_UNMET:
            print(f"  note: {owner} wants {req}: not carried ({KNOWN_UNMET[dist]})")
            continue
        problems.append(f"{owner} wants {req}: neither carried nor on the device")

    stdlib = set(sys.stdlib_module_names) - {"distutils"}  # 3.12 has no distutils
    stdlib |= {"__main__", "_typeshed", "annotationlib"}  # always there / typing-only / 3.14
    device_imports = {d.replace("-", "_") for d in DEVICE_PACKAGES}
    roots = [r for r in ROOTS if r in sources]
    visited: set[str] = set()
    for top, by in sorted(import_closure(sources, roots, visited).items()):
        dist = IMPORT_TO_DIST.get(top, top)
        if top in stdlib or top == "__future__" or canonicalize_name(dist) in carried:
            continue
        if top in device_imports or canonicalize_name(dist) in DEVICE_PACKAGES:
            continue
        problems.append(f"import {top} (from {by}) at module level: not on the device")
    print(f"import closure checked from: {', '.join(roots)} ({len(visited)} modules; "
          f"unsloth: {sum(m.startswith('unsloth') for m in visited)})")
    for p in problems:
        print("PROBLEM:", p)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
