"""No compute kernels fetched from the Hugging Face Hub in a lorapool process.

The `kernels` package (a dependency of transformers) downloads compiled kernels from the Hub
and imports them. bitsandbytes' CPU backend calls it as it is imported, on every CPU with
AVX512-BF16: `kernels.get_kernel("kernels-community/quantization-bitsandbytes")`, which looks up
huggingface.co and, online, downloads a shared library and loads it into the process. That is
remote code run at import time, in every worker that imports bitsandbytes, and traffic to the
outside from processes that should make none (a node may hold data that never leaves it).
bitsandbytes falls back to its own CPU code when the call fails, so nothing is lost.

`refuse_hub_kernels()` makes the Hub loaders of `kernels` (`get_kernel`, `get_locked_kernel`,
`load_kernel`, `install_kernel`) raise instead, and `has_kernel` answer False (it would ask the
Hub); loading a kernel from a local folder (`get_local_kernel`) still works. It patches the
module if it is imported already and otherwise the moment it is, so importing lorapool does not
import `kernels`, torch or anything heavy. It is installed when `lorapool.service` is imported;
an admin who wants Hub kernels sets `LORAPOOL_ALLOW_HUB_KERNELS=1`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

log = logging.getLogger(__name__)

ALLOW_ENV = "LORAPOOL_ALLOW_HUB_KERNELS"
HUB_LOADERS = ("get_kernel", "get_locked_kernel", "load_kernel", "install_kernel", "has_kernel")
_MARK = "_lorapool_refuses_hub"


class HubKernelRefused(RuntimeError):
    """Raised by the patched `kernels` loaders."""


def _refuser(name: str) -> Callable[..., Any]:
    def refuse(repo_id: Any = None, *args: Any, **kwargs: Any) -> Any:
        if name == "has_kernel":  # a question, not a load: "not available here"
            return False
        raise HubKernelRefused(
            f"lorapool loads no compute kernels from the Hugging Face Hub at run time "
            f"(kernels.{name}({repo_id!r}) refused; {ALLOW_ENV}=1 allows it)")
    refuse.__name__ = name
    setattr(refuse, _MARK, True)
    return refuse


def _patch(module: ModuleType) -> None:
    for name in HUB_LOADERS:
        if hasattr(module, name) and not getattr(getattr(module, name), _MARK, False):
            setattr(module, name, _refuser(name))


class _Quiet(logging.Filter):
    """bitsandbytes logs our refusal as a failed kernel download ("make sure you pip install
    kernels"): say it once, at debug level, as what it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "lorapool loads no compute kernels" in record.getMessage():
            log.debug("bitsandbytes' CPU backend asked the Hub for a kernel; refused, it uses "
                      "its own CPU code")
            return False
        return True


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _patch(module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds `kernels` through the other finders and patches it once it has run."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]],
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != "kernels":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def refuse_hub_kernels() -> bool:
    """Make the Hub loaders of `kernels` refuse in this process, now or when it is imported;
    False (and nothing changed) where `LORAPOOL_ALLOW_HUB_KERNELS=1`. Idempotent."""
    if os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_QUIET)
    module = sys.modules.get("kernels")
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
    return True


_QUIET = _Quiet()
