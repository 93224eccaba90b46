"""estimate_memory from many threads of a fresh process (the API's worker threads on the first
submits after start): every call succeeds. transformers' lazy imports are not thread-safe, and
a concurrent first import failed with ImportError (bench/api_load.py's storm saw 500s)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from lorapool.service.train.tiny import make_tiny_llama


def test_first_estimates_from_many_threads_all_succeed(tmp_path):
    model = make_tiny_llama(tmp_path / "tiny")
    script = textwrap.dedent(f"""
        import threading
        from lorapool.service.train.memory import estimate_memory
        from lorapool.service.train import memory
        from lorapool.service.train.spec import DeviceInfo, TrainSpec

        # Count how often the model is read (the real function still runs): a burst of first
        # estimates for one model reads it once, not once per thread.
        builds, real_load = [0], memory.load_config

        def counting_load(spec):
            builds[0] += 1
            return real_load(spec)

        memory.load_config = counting_load

        errors, barrier = [], threading.Barrier(16)

        def one(i):
            barrier.wait()
            try:
                spec = TrainSpec(base_model={str(model)!r}, max_seq_len=64 + i)
                estimate_memory(spec, DeviceInfo(kind="cuda", total_memory=8 << 30))
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("ERRORS", errors)
        print("BUILDS", builds[0])
        raise SystemExit(1 if errors else 0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "BUILDS 1\n" in out.stdout, out.stdout[-2000:]
