"""`import lorapool` must stay light: httpx + pydantic, nothing of the server or the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("typer", "torch", "ray", "transformers", "peft", "bitsandbytes", "fastapi",
             "uvicorn", "sqlalchemy", "yaml", "numpy", "lorapool.service", "lorapool.cli")

PROBE = """
import json, sys
from typing import Generic, Literal, Optional, TypeVar
import httpx, pydantic
# What httpx and pydantic load themselves once used (clients, models), optional extras included.
httpx.Client(); httpx.AsyncClient()
T = TypeVar("T")
class M(pydantic.BaseModel, Generic[T]):
    a: Literal["x"] = "x"
    b: Optional[list[T]] = None
    c: int = pydantic.Field(0, ge=0)
M[int].model_validate({"b": [1]})
before = set(sys.modules)
import lorapool, lorapool.errors, lorapool.types
c = lorapool.Client("http://127.0.0.1:1", api_key="x")
a = lorapool.AsyncClient("http://127.0.0.1:1", api_key="x")
print(json.dumps({"all": sorted(sys.modules), "new": sorted(set(sys.modules) - before),
                  "stdlib": sorted(sys.stdlib_module_names)}))
"""


def test_import_lorapool_pulls_in_only_httpx_and_pydantic():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=60)
    mods = json.loads(out.stdout)
    loaded = set(mods["all"])
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == [], f"import lorapool loaded {bad}"
    # Beyond what httpx and pydantic load themselves (httpx imports rich/click for its own
    # CLI when they are installed), lorapool adds only its own modules and the stdlib.
    stdlib = set(mods["stdlib"])
    extra = [m for m in mods["new"]
             if m.split(".")[0] not in stdlib and m.split(".")[0] != "lorapool"]
    assert extra == [], f"import lorapool loaded third-party modules {extra}"
    assert "lorapool._sync" in loaded and "lorapool._async" in loaded  # the probe did run
