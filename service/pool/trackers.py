"""Experiment trackers (OpenAI's `integrations`): W&B and MLflow, logged by the server.

Nodes need no internet: the head hears every committed job event (a store subscriber, see
subscriber.py, so the scheduler never waits on a tracker) and logs, per job that asked for it,
training loss, validation loss, learning rate and tokens/s per step, and at the end the
adapter's metadata. A tracker that fails (not installed, a refused URI, any exception) is
switched off for that job with a warning event "tracker mlflow failed: …"; the job goes on.

Where trackers write, by default inside the data dir and per tenant:
- W&B: offline mode, runs under `{data_dir}/trackers/{tenant}/wandb` (`wandb sync` uploads them
  later), with the SDK's own telemetry off (`WANDB_ERROR_REPORTING=false` unless set). An admin
  may set LORAPOOL_WANDB_MODE=online (with W&B's own credentials).
- MLflow: `tracking_uri` none → a file store `{data_dir}/trackers/{tenant}/mlruns`; a relative
  path → under `{data_dir}/trackers/{tenant}/`; an absolute path / file: URI must lie inside
  that folder too, and an http(s) server is refused: a tenant must neither write files where it
  likes on the head nor make the head call hosts of its choosing. The admin lifts that with
  LORAPOOL_TRACKER_ALLOW: comma-separated directories and http(s) URL prefixes.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Protocol
from urllib.parse import unquote, urlparse

from ..store.records import TERMINAL, EventRecord, JobRecord, JobStatusChange
from .subscriber import StoreSubscriber

log = logging.getLogger("lorapool.trackers")

ALLOW_ENV = "LORAPOOL_TRACKER_ALLOW"
WANDB_MODE_ENV = "LORAPOOL_WANDB_MODE"
FAILED_PREFIX = "tracker "

# Event data key → the name the trackers log it under.
STEP_KEYS = {"train_loss": "train/loss", "lr": "train/learning_rate",
             "tokens_per_s": "train/tokens_per_s", "grad_norm": "train/grad_norm"}
EVAL_KEYS = {"valid_loss": "eval/loss"}


class TrackerRefused(ValueError):
    """The tracker's settings are not allowed on this server."""


def _allowed() -> list[str]:
    return [a.strip() for a in os.environ.get(ALLOW_ENV, "").split(",") if a.strip()]


def tenant_dir(data_dir: Path, tenant: str) -> Path:
    return Path(data_dir).resolve() / "trackers" / tenant


def resolve_mlflow_uri(uri: Optional[str], data_dir: Path, tenant: str,
                       allow: Optional[list[str]] = None) -> str:
    """The tracking URI MLflow gets for `uri` as the tenant gave it, or TrackerRefused."""
    allow = _allowed() if allow is None else allow
    home = tenant_dir(data_dir, tenant)
    if uri is None:
        return (home / "mlruns").as_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        if any(uri.startswith(a) for a in allow if a.startswith(("http://", "https://"))):
            return uri
        raise TrackerRefused(f"the MLflow server {parsed.scheme}://{parsed.netloc} is not "
                             f"allowed on this server (its admin lists allowed ones in {ALLOW_ENV})")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise TrackerRefused("a file: URI must name a local path")
        raw = Path(unquote(parsed.path))
    elif parsed.scheme == "":
        raw = Path(uri)
    else:
        raise TrackerRefused(f"unsupported tracking URI scheme {parsed.scheme!r}")
    # realpath: a symlink inside the tenant's folder must not lead out of it.
    path = Path(os.path.realpath(raw if raw.is_absolute() else home / raw))
    roots = [home] + [Path(os.path.realpath(a)) for a in allow if "://" not in a]
    if not any(path == r or r in path.parents for r in roots):
        raise TrackerRefused(f"the path {str(raw)!r} is outside this tenant's tracker folder "
                             f"(a relative path goes under it; its admin may allow more in "
                             f"{ALLOW_ENV})")
    return path.as_uri()


class Tracker(Protocol):
    kind: str

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self, status: str, summary: dict[str, Any]) -> None: ...


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is not None:
            out[f"{prefix}{k}"] = v
    return out


class WandbTracker:
    kind = "wandb"

    def __init__(self, cfg: dict[str, Any], job: JobRecord, data_dir: Path) -> None:
        # W&B's SDK reports its own telemetry (OpenTelemetry, to api.forge.coreweave.com, once
        # a minute) even for offline runs, unless this is off; read when wandb sets up.
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        folder = tenant_dir(data_dir, job.tenant) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=cfg["project"], name=cfg.get("name") or job.id, entity=cfg.get("entity"),
            tags=cfg.get("tags") or None, dir=str(folder), id=None,
            mode=os.environ.get(WANDB_MODE_ENV, "offline"),  # type: ignore[arg-type]
            config={"job_id": job.id, "model": job.model, **_job_config(job)},
            reinit="create_new",  # one run per job, several jobs at once in this process
            settings=wandb.Settings(silent=True, console="off", disable_git=True,
                                    x_disable_stats=True, x_disable_meta=True),
        )

    @property
    def run_dir(self) -> str:
        return str(self._run.dir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        for k, v in _flat(summary).items():
            self._run.summary[k] = v
        self._run.finish(exit_code=0 if status == "succeeded" else 1)


class MlflowTracker:
    kind = "mlflow"

    def __init__(self, cfg: dict[str, Any], job: JobRecord, data_dir: Path) -> None:
        uri = resolve_mlflow_uri(cfg.get("tracking_uri"), data_dir, job.tenant)
        # MLflow >= 3.7 refuses its file store unless asked (it is "in maintenance mode"); a
        # folder is what a server with no database of its own can offer every tenant.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the file store's deprecation notice
            from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=uri)
        name = cfg.get("experiment") or "lorapool"
        exp = self._client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(name)
        run = self._client.create_run(exp_id, run_name=cfg.get("run_name") or job.id,
                                      tags={"lorapool.job_id": job.id, "lorapool.model": job.model})
        self.run_id = run.info.run_id
        self.tracking_uri = uri
        params = {k: str(v)[:500] for k, v in _flat(_job_config(job)).items()}
        for k, v in params.items():
            self._client.log_param(self.run_id, k, v)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[
            Metric(k.replace("/", "_"), float(v), now, step) for k, v in metrics.items()])

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        flat = _flat(summary)
        for k, v in flat.items():
            self._client.set_tag(self.run_id, f"lorapool.{k}", str(v)[:5000])
        self._client.log_dict(self.run_id, summary, "lorapool_adapter.json")
        self._client.set_terminated(self.run_id, status={
            "succeeded": "FINISHED", "cancelled": "KILLED"}.get(status, "FAILED"))


BACKENDS: dict[str, Any] = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def _job_config(job: JobRecord) -> dict[str, Any]:
    spec = {k: job.spec.get(k) for k in ("n_epochs", "batch_size", "micro_batch_size",
                                         "learning_rate", "max_seq_len", "quantization",
                                         "lora", "seed")}
    return {**spec, "training_file": job.training_file, "validation_file": job.validation_file}


def _numbers(data: dict[str, Any], keys: dict[str, str]) -> dict[str, float]:
    return {name: float(data[k]) for k, name in keys.items()
            if isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool)}


class TrackerHub(StoreSubscriber):
    """Logs each job that has integrations to its trackers; see the module docstring."""

    name = "trackers"

    def __init__(self, data_dir: Path, maxsize: int = 10_000) -> None:
        super().__init__(maxsize)
        self.data_dir = Path(data_dir)
        # job id → its live trackers; None: the job has no integrations (asked once).
        self._jobs: dict[str, Optional[list[Any]]] = {}

    def _fail(self, job_id: str, kind: str, exc: BaseException) -> None:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, ImportError):
            reason = f"{reason} (pip install 'lorapool[trackers]')"
        log.warning("tracker %s of %s failed: %s", kind, job_id, reason)
        self.store.add_event(job_id, f"{FAILED_PREFIX}{kind} failed: {reason}"[:2000],
                             level="warn", data={"tracker": kind})

    def _trackers(self, job_id: str) -> Optional[list[Any]]:
        if job_id in self._jobs:
            return self._jobs[job_id]
        job = self.store.get_job(job_id)
        if job is None or not job.integrations:
            self._jobs[job_id] = None
            return None
        live: list[Any] = []
        for integ in job.integrations:
            kind = integ.get("type", "?")
            try:
                live.append(BACKENDS[kind](integ.get(kind) or {}, job, self.data_dir))
            except Exception as exc:  # not installed, refused, the tracker's own errors
                self._fail(job_id, kind, exc)
        self._jobs[job_id] = live
        return live

    def _each(self, job_id: str, trackers: list[Any], call: str, *args: Any) -> None:
        for t in list(trackers):
            try:
                getattr(t, call)(*args)
            except Exception as exc:
                trackers.remove(t)  # one failure switches it off for this job
                self._fail(job_id, t.kind, exc)

    def handle(self, topic: str, item: Any, at: float) -> None:
        if isinstance(item, EventRecord):
            if item.type != "metrics" or not item.data:
                return
            trackers = self._trackers(item.job_id)
            step = item.data.get("step")
            if not trackers or not isinstance(step, int):
                return
            metrics = {**_numbers(item.data, STEP_KEYS), **_numbers(item.data, EVAL_KEYS)}
            if metrics:
                self._each(item.job_id, trackers, "log", metrics, step)
        elif isinstance(item, JobStatusChange) and item.status in TERMINAL:
            trackers = self._trackers(item.job_id)
            self._jobs.pop(item.job_id, None)
            if trackers:
                self._each(item.job_id, trackers, "finish", item.status,
                           self._summary(item.job_id, item.status))

    def _summary(self, job_id: str, status: str) -> dict[str, Any]:
        """The final adapter's metadata (and the job's outcome)."""
        job = self.store.get_job(job_id)
        out: dict[str, Any] = {"job_id": job_id, "status": status}
        if job is None:
            return out
        out.update(trained_tokens=job.trained_tokens, fine_tuned_model=job.fine_tuned_model)
        if job.error_message:
            out["error"] = job.error_message[:1000]
        adapter = self.store.get_adapter(job.adapter_id) if job.adapter_id else None
        if adapter is not None:
            out["adapter"] = {"id": adapter.id, "base_model": adapter.base_model,
                              "base_model_sha256": adapter.base_model_sha256,
                              "sha256": adapter.sha256, "bytes": adapter.bytes,
                              "metrics": dict(adapter.metrics or {})}
        return out

    def close(self) -> None:
        # Runs still open at shutdown (jobs that will resume later) are closed as they stand.
        for job_id, trackers in list(self._jobs.items()):
            if trackers:
                self._each(job_id, trackers, "finish", "interrupted", {"job_id": job_id})
        self._jobs.clear()
