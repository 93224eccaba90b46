"""Loss scaling for fp16 compute (CUDA cards before compute capability 8.0: GTX 1650, T4, 2080).

fp16 has 5 exponent bits: small gradients underflow to zero. The loss is multiplied by a scale
before backward, the LoRA gradients (fp32 master weights: peft keeps adapters in fp32) are
divided by it before clipping, and a step whose gradients hold an inf/NaN is skipped and the
scale halved; after `growth_interval` good steps it doubles. This is torch.amp's `GradScaler`,
wrapped so the loop learns whether the step ran (to count skipped steps and to hold the LR
schedule back, as accelerate does). bf16 and fp32 need none of it: the wrapper is then a no-op.
"""

from __future__ import annotations

from typing import Any

import torch


def needs_loss_scaling(compute_dtype: torch.dtype) -> bool:
    return compute_dtype == torch.float16


class LossScaler:
    """`GradScaler` with `step()` returning whether the optimizer really stepped."""

    def __init__(self, enabled: bool, device_type: str, *, init_scale: float = 2.0**16,
                 growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scaler = torch.amp.GradScaler(device_type, init_scale=init_scale,
                                           growth_interval=growth_interval, enabled=enabled)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale (before clipping) and note any inf/NaN."""
        if self.enabled:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer unless the gradients overflowed; update the scale. True = stepped."""
        if not self.enabled:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # update() only lowers the scale after an overflow, i.e. exactly when step() skipped.
        return self.scaler.get_scale() >= before

    @property
    def scale_value(self) -> float | None:
        return self.scaler.get_scale() if self.enabled else None

    def state_dict(self) -> dict[str, Any] | None:
        return dict(self.scaler.state_dict()) if self.enabled else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.enabled and state:
            self.scaler.load_state_dict(state)
