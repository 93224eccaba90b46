"""Node-local data sets: data a donor offers that never leaves its machine.

`lorapool donate --dataset NAME=PATH` puts `NAME → PATH` into the node's `AgentConfig.datasets`.
The NodeAgent validates each file here, on the node, with the trainer's own validation
(`service.train.data_validate.validate_dataset`), and reports only what `describe()` returns:
name, example and line counts, format, and the line errors (line number + reason) — never a
path, a hash or a byte of content. A job names the data set (`dataset: "NODE:NAME"`) instead of
an uploaded file; it is pinned to that node, and its runner opens the file there by name.

Validation is cached per file (size, mtime), so a heartbeat re-checks a changed file but never
re-reads an unchanged one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_REPORTED_ERRORS = 20


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ValueError(f"data set name {name!r} must be 1-64 letters, digits, '_', '.' or '-' "
                         "(starting with a letter or digit)")
    return name


def parse_ref(value: Any) -> tuple[str, str]:
    """(node, name) from "NODE:NAME" or {"node": ..., "name": ...}; ValueError says why not."""
    if isinstance(value, dict):
        node, name = value.get("node"), value.get("name")
        if set(value) - {"node", "name"}:
            raise ValueError(f"unknown keys {sorted(set(value) - {'node', 'name'})}; expected "
                             "'node' and 'name'")
    elif isinstance(value, str) and ":" in value:
        node, _, name = value.rpartition(":")
    else:
        raise ValueError("must be 'NODE:NAME' or {\"node\": NODE, \"name\": NAME}")
    if not isinstance(node, str) or not node.strip() or len(node) > 128:
        raise ValueError("the node name must be a non-empty string (at most 128 characters)")
    if not isinstance(name, str):
        raise ValueError("the data set name must be a string")
    return node.strip(), check_name(name)


class DatasetCatalog:
    """One node's offered data sets and their validation, cached per file version."""

    def __init__(self, datasets: dict[str, str],
                 tenants: Optional[dict[str, list[str]]] = None) -> None:
        self.paths = {check_name(n): str(Path(p).expanduser()) for n, p in datasets.items()}
        self.tenants = {n: sorted(set(t)) for n, t in (tenants or {}).items()}
        self._cache: dict[str, tuple[Optional[tuple[int, int]], dict[str, Any]]] = {}

    def path(self, name: str) -> Optional[Path]:
        p = self.paths.get(name)
        return Path(p) if p else None

    def describe(self) -> list[dict[str, Any]]:
        """Counts and line errors of every data set (no content, no path), and the tenants the
        donor granted it to (the server shows each tenant only the sets it may use)."""
        return [{**self._describe(name), "tenants": self.tenants.get(name, [])}
                for name in sorted(self.paths)]

    def _describe(self, name: str) -> dict[str, Any]:
        path = self.paths[name]
        try:
            st = os.stat(path)
            version: Optional[tuple[int, int]] = (st.st_size, st.st_mtime_ns)
        except OSError:
            version = None
        cached = self._cache.get(name)
        if cached is not None and cached[0] == version and version is not None:
            return cached[1]
        info = {"name": name, "examples": None, "lines": None, "format": None,
                "valid": False, "errors": []}
        if version is None:
            info["errors"] = ["the data set's file is missing on its node"]
        else:
            from ..train.data_validate import validate_dataset
            from ..train.errors import DataError

            try:
                report = validate_dataset(path, max_errors=MAX_REPORTED_ERRORS)
                info.update(examples=report.n_examples, lines=report.n_lines,
                            format=report.format, valid=True)
            except DataError as exc:
                # The message names each bad line and its reason, as for an upload.
                info["errors"] = exc.message.splitlines()[: MAX_REPORTED_ERRORS + 2]
            except OSError as exc:
                info["errors"] = [f"the data set's file cannot be read on its node "
                                  f"({exc.strerror or type(exc).__name__})"]
        self._cache[name] = (version, info)
        return info
