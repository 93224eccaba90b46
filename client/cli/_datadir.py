"""The one place that says where the server's data directory is, shared by `serve`,
`token create`, `models add/list --local` and every other server-side command.

Order: the `--data-dir` flag, then LORAPOOL_DATA_DIR, then `data_dir` in the config file
(`$XDG_CONFIG_HOME/lorapool/config.toml`, by default ~/.config/lorapool/config.toml, or the
file LORAPOOL_CONFIG names), which `lorapool serve --data-dir D` writes, then the server's
default (~/.lorapool). So `serve --data-dir D` followed by a plain `token create` writes the
token where that server reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    tomllib = None  # type: ignore[assignment]


def config_path() -> Path:
    explicit = os.environ.get("LORAPOOL_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or "~/.config"
    return Path(base).expanduser() / "lorapool" / "config.toml"


def _read() -> dict[str, object]:
    path = config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    if tomllib is not None:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            return {}
    # 3.10: the file is ours and holds `key = "value"` lines only.
    values: dict[str, object] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and value.strip().startswith('"'):
            values[key.strip()] = value.strip().strip('"').replace('\\\\', '\\')
    return values


def configured_data_dir() -> Optional[Path]:
    """`data_dir` from the config file, if it names one."""
    value = _read().get("data_dir")
    return Path(str(value)).expanduser() if isinstance(value, str) and value else None


def resolve_data_dir(flag: Optional[Path]) -> Optional[Path]:
    """The data dir a server-side command should use: the flag, else None when
    LORAPOOL_DATA_DIR is set (the server's settings read it), else the config file's, else
    None (the server's default)."""
    if flag is not None:
        return flag.expanduser()
    if os.environ.get("LORAPOOL_DATA_DIR"):
        return None
    return configured_data_dir()


def remember_data_dir(data_dir: Path) -> Path:
    """Record `data_dir` as the default for later server-side commands; returns the file."""
    path = config_path()
    values = {k: v for k, v in _read().items() if isinstance(v, str)}
    values["data_dir"] = str(Path(data_dir).expanduser().resolve())
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Written by `lorapool serve`: where the server keeps its data.\n"]
    for key, value in values.items():
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{key} = "{escaped}"\n')
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path
