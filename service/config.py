"""The service's settings: one pydantic object built from defaults, environment and overrides.

Everything the server keeps lives under one data directory (the SQLite file, the artifact
folder, caches) unless a setting points elsewhere. `Settings.from_env(**overrides)` is the one
way to build it: explicit overrides (CLI flags, tests) win over `LORAPOOL_*` environment
variables, which win over the defaults. Paths derived from `data_dir` follow it unless set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

MiB = 1024**2

# Setting name → environment variable. Derived paths have variables too, for deployments that
# put the database or the artifacts on another disk.
ENV_VARS: dict[str, str] = {
    "data_dir": "LORAPOOL_DATA_DIR",
    "database_url": "LORAPOOL_DATABASE_URL",
    "artifacts_dir": "LORAPOOL_ARTIFACTS_DIR",
    "cache_dir": "LORAPOOL_CACHE_DIR",
    "max_upload_bytes": "LORAPOOL_MAX_UPLOAD_BYTES",
    "allow_trust_remote_code": "LORAPOOL_ALLOW_TRUST_REMOTE_CODE",
    "host": "LORAPOOL_HOST",
    "port": "LORAPOOL_PORT",
    "ray_address": "LORAPOOL_RAY_ADDRESS",
    "preempt_timeout": "LORAPOOL_PREEMPT_TIMEOUT",
    "heartbeat_timeout": "LORAPOOL_HEARTBEAT_TIMEOUT",
    "max_attempts": "LORAPOOL_MAX_ATTEMPTS",
}


class Settings(BaseModel):
    """Where the service keeps its state and how it listens. See the module docstring."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data_dir: Path = Field(default_factory=lambda: Path("~/.lorapool"))
    database_url: Optional[str] = None  # default: sqlite:///{data_dir}/lorapool.db
    artifacts_dir: Optional[Path] = None  # default: {data_dir}/artifacts
    cache_dir: Optional[Path] = None  # default: {data_dir}/cache
    max_upload_bytes: int = Field(512 * MiB, ge=1)
    allow_trust_remote_code: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    ray_address: Optional[str] = None
    # Resilience: seconds a preempted job may take to checkpoint and stop before it is killed
    # (and resumes from its last periodic checkpoint); seconds of silence before a node counts
    # as lost; attempts a job gets when the infrastructure fails it (node lost, preempted, OOM).
    preempt_timeout: float = Field(30.0, gt=0, le=3600)
    heartbeat_timeout: float = Field(20.0, gt=0, le=3600)
    max_attempts: int = Field(3, ge=1, le=100)

    @model_validator(mode="after")
    def _derive_paths(self) -> "Settings":
        # object.__setattr__: validate_assignment would re-run this validator on each set.
        data_dir = Path(self.data_dir).expanduser().resolve()
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{data_dir / 'lorapool.db'}")
        for name, default in (("artifacts_dir", "artifacts"), ("cache_dir", "cache")):
            value = getattr(self, name)
            path = data_dir / default if value is None else Path(value).expanduser().resolve()
            object.__setattr__(self, name, path)
        return self

    @classmethod
    def from_env(cls, environ: Optional[dict[str, str]] = None, **overrides: Any) -> "Settings":
        """Defaults, then `LORAPOOL_*` variables, then `overrides` (None values are skipped so
        a CLI can pass its unset options straight through)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is not None and raw != "":
                values[name] = _parse_bool(var, raw) if name == "allow_trust_remote_code" else raw
        unknown = set(overrides) - set(cls.model_fields)
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def is_sqlite(self) -> bool:
        return str(self.database_url).startswith("sqlite")


def _parse_bool(var: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{var}={raw!r} is not a boolean (use 1/0, true/false)")
