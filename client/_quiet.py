"""Silence known library noise in the client's entry points (`lorapool.load`, the CLI).

Each entry names one logger and why: a warning that tells a user nothing they can act on.
Only levels are raised (to ERROR), so real errors of those libraries still show.
"""

from __future__ import annotations

import logging

NOISY_LOGGERS = {
    # bitsandbytes tries an optional Hub kernel (`kernels` package) for CPU 4-bit matmuls on
    # AVX512-BF16 machines and warns when it is absent; its own fallback works fine.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
    "bitsandbytes.backends.mps.ops": logging.ERROR,
}


def quiet_libraries() -> None:
    """Raise the noisy loggers' levels; cheap and idempotent (imports nothing)."""
    for name, level in NOISY_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.level < level:
            logger.setLevel(level)
