"""Fixtures for the dashboard tests: a real service (uvicorn on loopback, a local Ray head,
SQLite, the real trainer on a tiny random Llama) and Debian's headless Chromium driven by
Playwright. Playwright's own browser download cannot run here, so the system's chromium is
used (`apt-get install -y chromium`); without it (or without the `playwright` package) the
tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

GiB = 1024**3
SCREENSHOTS = Path(__file__).with_name("screenshots")


def chromium_path() -> str | None:
    for candidate in (os.environ.get("LORAPOOL_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def chat_lines(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                            {"role": "assistant", "content": str(a + b)}]}))
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def browser() -> Any:
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium: apt-get install -y chromium (Playwright's own browser "
                    "download does not work offline)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory, browser) -> Any:
    """`lorapool serve` as the CLI builds it, on a free loopback port, with one CPU node."""
    from lorapool.service.admin import add_model, create_token
    from lorapool.service.config import Settings
    from lorapool.service.server import Service, free_port
    from lorapool.service.train.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("ui")
    model_dir = make_tiny_llama(root / "tiny-llama")
    settings = Settings.from_env(data_dir=root / "data", host="127.0.0.1", port=free_port())
    add_model(settings, "tiny-llama", model_dir)
    tokens = {"admin": create_token(settings, "ops", admin=True),
              "acme": create_token(settings, "acme")}
    svc = Service(settings,
                  local_node_options={"name": "local-cpu", "cpu_only": True,
                                      "cpu_memory": 8 * GiB, "work_dir": str(root / "node")},
                  ray_init_options={"num_cpus": 2})
    svc.start()
    (root / "train.jsonl").write_text(chat_lines(16))
    (root / "valid.jsonl").write_text(chat_lines(8, seed=1))
    SCREENSHOTS.mkdir(exist_ok=True)
    try:
        yield {"svc": svc, "url": svc.base_url, "tokens": tokens, "root": root}
    finally:
        svc.stop()


@pytest.fixture
def page(browser, service) -> Any:
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    # Any script error or CSP violation fails the test that caused it.
    pg.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    pg.on("console", lambda m: errors.append(f"console {m.type}: {m.text}")
          if m.type == "error" else None)
    pg.errors = errors  # type: ignore[attr-defined]
    yield pg
    context.close()
