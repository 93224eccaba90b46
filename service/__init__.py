"""lorapool's service: the API, store, pool, trainer and artifact packages (`api` → `store` →
`pool` → `train`, with `artifacts` and `merge` beside them).

Importing it makes every lorapool process refuse compute kernels from the Hugging Face Hub
(hub_guard.py: bitsandbytes would otherwise fetch one as it is imported).
"""

from .hub_guard import refuse_hub_kernels

refuse_hub_kernels()
