"""The scheduler's per-pass cost of turning the queue into placement views, at 1,000 queued.

Every pass (every 0.5 s, and on each submit) the scheduler reads the queued jobs from the store
and hands the placer one `JobView` per job. Baseline: what it did until `pool/job_views.py` —
a model lookup in the store, a `TrainSpec` validation and a new view for every job, every
pass. lorapool: `JobViews`, which keeps each queued job's view while its inputs stay the same
(and so also lets the placer's per-job caches hit by identity). Reading the queue from SQLite,
which both do, is printed for scale. CPU time of this process, median of `--passes`.

    python bench/scheduler_pass.py [--jobs 1000] [--passes 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args(argv)

    from lorapool.service.admin import add_model
    from lorapool.service.config import Settings
    from lorapool.service.pool.job_views import JobViews
    from lorapool.service.pool.scheduler import job_view
    from lorapool.service.store import JobRecord, Store, new_id
    from lorapool.service.train.spec import TrainSpec
    from lorapool.service.train.tiny import make_tiny_llama

    with tempfile.TemporaryDirectory(prefix="lorapool-sched-pass-") as tmp:
        root = Path(tmp)
        settings = Settings.from_env(environ={}, data_dir=root / "data")
        add_model(settings, "tiny", make_tiny_llama(root / "tiny"))
        store = Store(str(settings.database_url))
        model = store.get_model("tiny")
        spec = TrainSpec(base_model=str(model.path)).model_dump(mode="json",
                                                                exclude={"base_model"})
        for i in range(args.jobs):
            store.create_job(JobRecord(id=new_id("ftjob"), tenant=f"tenant-{i % 5}",
                                       model="tiny", status="queued", spec=spec, placement={}))

        def timed(fn) -> float:
            runs = []
            for _ in range(args.passes):
                t0 = time.process_time()
                fn()
                runs.append((time.process_time() - t0) * 1e3)
            return statistics.median(runs)

        queued = store.jobs_in_status("queued")

        def baseline() -> None:
            for j in queued:
                m = store.get_model(j.model)
                s = TrainSpec(**{**dict(j.spec), "base_model": str(m.path)})
                job_view(j.id, j.tenant, s, float(j.created_at), j.placement)

        views = JobViews(job_view)
        views.views(queued, {m.name: m for m in store.list_models()})  # the first pass builds

        def kept() -> None:
            views.views(queued, {m.name: m for m in store.list_models()})

        read = timed(lambda: store.jobs_in_status("queued"))
        base, ours = timed(baseline), timed(kept)
        store.close()
    print(f"\nscheduler pass, {args.jobs} queued jobs (CPU ms per pass, median of {args.passes})")
    print(f"{'':<52} {'ms':>8}")
    print(f"{'baseline: lookup + TrainSpec + view per job':<52} {base:>8.1f}")
    print(f"{'lorapool: JobViews (views kept across passes)':<52} {ours:>8.1f}")
    print(f"{'(reading the queue from SQLite, both)':<52} {read:>8.1f}")
    print(f"speed-up of the view step: {base / max(ours, 1e-6):.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
