"""An exponential moving average of the trained weights, for the model a run leaves behind.

After optimizer step t the average is

    avg_t = sum_{i=1..t} d^(t-i) (1 - d) w_i / (1 - d^t)

the weights of every step so far, the recent ones weighted most (a window of about 1 / (1 - d) steps). The
division by 1 - d^t (Adam's bias correction) makes the weights sum to one, so the starting weights never enter and
a short run is not pulled back towards them. It is kept as `ema_t = d ema_{t-1} + (1 - d) w_t` from ema_0 = 0.

Why: greedy held-out accuracy of a small model moves by several points between checkpoints a few dozen steps apart
at the end of a run (docs/results.md), because answers on the edge flip with small weight changes; an average of
the last steps' weights does not depend on where the last step happened to land. Rollouts always use the live
weights; only `final/` and the evaluation after training use the average (`optim.weight_ema_decay`); evaluations
during the run (`eval.every`) score the live weights. With LoRA the trained parameters are the adapter's factors, so
the factors are averaged, not their merged product.
"""

from __future__ import annotations

import torch


class WeightAverage:
    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight average decay must be in (0, 1), got {decay}")
        self.params = params
        self.decay = decay
        self.steps = 0
        self.ema = [torch.zeros_like(p, dtype=torch.float32) for p in params]  # float32 even for bf16 weights

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the current weights (call after each optimizer step that changed them)."""
        self.steps += 1
        for e, p in zip(self.ema, self.params, strict=True):  # one tensor at a time: no float copy of the whole model
            e.mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def averaged(self) -> list[torch.Tensor]:
        """The bias-corrected average, one tensor per parameter (the live weights before any update)."""
        if self.steps == 0:
            return [p.detach().clone() for p in self.params]
        scale = 1.0 / (1.0 - self.decay ** self.steps)
        return [(e * scale).to(p.dtype) for e, p in zip(self.ema, self.params, strict=True)]

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Overwrite the live weights with the average (at the end of a run)."""
        for p, a in zip(self.params, self.averaged(), strict=True):
            p.copy_(a)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "ema": [e.cpu() for e in self.ema]}

    def load_state_dict(self, state: dict) -> None:
        if state["decay"] != self.decay:  # the bias correction assumes one decay throughout
            raise ValueError(f"the checkpoint's weight average has decay {state['decay']}; resume with "
                             f"optim.weight_ema_decay={state['decay']} (this run asks for {self.decay})")
        if len(state["ema"]) != len(self.ema):
            raise ValueError(f"weight average of {len(state['ema'])} tensors cannot be loaded into a model with "
                             f"{len(self.ema)} trainable parameters")
        self.steps = int(state["steps"])
        for e, s in zip(self.ema, state["ema"], strict=True):
            e.copy_(s)
