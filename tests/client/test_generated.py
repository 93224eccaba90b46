"""The blocking client is generated from the async one (scripts/gen_sync.py): the committed
`client/_sync.py` must be exactly what the generator makes, and the two must offer the same
methods with the same signatures."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import lorapool

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_sync", ROOT / "scripts" / "gen_sync.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sync_client_is_up_to_date_with_the_async_source():
    gen = _generator()
    expected = gen.unasync((ROOT / "client" / "_async.py").read_text(encoding="utf-8"))
    actual = (ROOT / "client" / "_sync.py").read_text(encoding="utf-8")
    assert actual == expected, "client/_sync.py is stale: run python scripts/gen_sync.py"
    assert gen.main(["--check"]) == 0


def test_generator_rewrites_async_constructs():
    gen = _generator()
    out = gen.unasync('async def f(x: AsyncIterator[int]) -> None:\n'
                      '    """`async for e in AsyncClient().jobs`"""\n'
                      '    async for e in x:\n        await asyncio.sleep(1)\n'
                      '    await r.aclose()\n')
    body = out.split("\n", 2)[2]  # after the two header lines
    assert body == ('def f(x: Iterator[int]) -> None:\n'
                    '    """`for e in Client().jobs`"""\n'
                    '    for e in x:\n        time.sleep(1)\n'
                    '    r.close()\n')


def _methods(cls: type) -> dict[str, list[str]]:
    # Parameter names and kinds (return types differ: Iterator vs AsyncIterator).
    return {n: [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]
            for n, f in inspect.getmembers(cls, inspect.isfunction)
            if not n.startswith("_")}


def test_both_clients_offer_the_same_methods():
    pairs = [(lorapool.Client, lorapool.AsyncClient)]
    client = lorapool.Client("http://127.0.0.1:9")
    aclient = lorapool.AsyncClient("http://127.0.0.1:9")
    for name in ("files", "jobs", "models", "adapters", "nodes", "merges", "evaluations",
                 "federations"):
        pairs.append((type(getattr(client, name)), type(getattr(aclient, name))))
    for sync_cls, async_cls in pairs:
        assert _methods(sync_cls) == _methods(async_cls), sync_cls


def test_submit_signature_comes_from_submit_params():
    from lorapool._plans import SubmitParams

    sig = inspect.signature(lorapool.Client.submit)
    assert list(sig.parameters)[1:] == list(SubmitParams.model_fields)
    assert sig.parameters["model"].default is inspect.Parameter.empty
    assert "n_epochs:" in lorapool.AsyncClient.submit.__doc__
