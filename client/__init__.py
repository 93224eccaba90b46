"""lorapool: the light Python client of a lorapool fine-tuning service (httpx + pydantic only).

    from lorapool import Client
    client = Client("http://127.0.0.1:8000", api_key="lp-...")  # or LORAPOOL_BASE_URL/_API_KEY
    job = client.submit("smollm2-135m", "train.jsonl", n_epochs=2)  # a local path is uploaded
    job = client.jobs.wait(job.id, progress=True)
    client.adapters.download(job.fine_tuned_model, "./adapter")

`AsyncClient` has the same methods, awaitable. Errors are in `lorapool.errors`, the REST
resources in `lorapool.types`. The server is `lorapool.service` (the `service` extra); nothing
of it (nor torch, ray, typer or rich) is imported here.
"""

from __future__ import annotations

from ._async import AsyncClient
from ._sync import Client
from .errors import (
                     APIConnectionError,
                     APIResponseValidationError,
                     APIStatusError,
                     APITimeoutError,
                     ArchiveLimitError,
                     AuthenticationError,
                     BadRequestError,
                     ConflictError,
                     InternalServerError,
                     InvalidParameterError,
                     InvalidRequestError,
                     JobWaitTimeout,
                     LorapoolError,
                     NotFoundError,
                     PayloadTooLargeError,
                     PermissionDeniedError,
                     RateLimitError,
                     UnsafeArchiveError,
)
from .load import load  # torch/peft are imported only when it is called
from .types import (
                     TERMINAL_STATUSES,
                     Adapter,
                     Evaluation,
                     FileObject,
                     FineTuningJob,
                     JobCheckpoint,
                     JobEvent,
                     JobPlacement,
                     ListResponse,
                     LoraParams,
                     Merge,
                     Model,
                     Node,
                     NodeGpu,
)

__all__ = [
    "Client", "AsyncClient", "load",
    "LorapoolError", "APIConnectionError", "APITimeoutError", "APIStatusError",
    "APIResponseValidationError", "AuthenticationError", "BadRequestError",
    "InvalidRequestError", "PermissionDeniedError", "NotFoundError", "ConflictError",
    "PayloadTooLargeError", "RateLimitError", "InternalServerError", "InvalidParameterError",
    "JobWaitTimeout", "UnsafeArchiveError", "ArchiveLimitError",
    "FineTuningJob", "JobEvent", "JobCheckpoint", "FileObject", "Model", "Adapter", "Node",
    "NodeGpu",
    "JobPlacement", "ListResponse", "LoraParams", "TERMINAL_STATUSES",
    "Merge", "Evaluation",
]
