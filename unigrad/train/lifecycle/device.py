"""Where the learner runs: `model.device` resolved to a torch device.

The learner (model, optimizer, log-prob passes) and the colocated transformers rollout engine run on this device.
The step's bookkeeping (rollouts, rewards, advantages, masks, metrics) stays on the CPU: those tensors are small, and
only each micro-batch goes to the device for its forward and backward pass (unigrad.train.step).

- `auto`: `cuda:LOCAL_RANK` when CUDA is available (LOCAL_RANK from torchrun / accelerate launch, 0 by default),
  else `cpu`;
- `cuda`: `cuda:LOCAL_RANK`, an error without CUDA;
- `cuda:N`, `cpu`, `mps`: that device, an error when it is not available.
"""

from __future__ import annotations

import os

import torch


def resolve_device(spec: str, environ: dict[str, str] | None = None) -> torch.device:
    """The torch device `model.device=spec` names for this process (see the module docstring).

    Raises ValueError naming `model.device` for an unknown or unavailable device."""
    environ = os.environ if environ is None else environ
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"model.device={spec!r} is not a device (use auto, cpu, cuda, cuda:N or mps)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"model.device={spec!r}, but torch sees no CUDA device (torch {torch.__version__}); "
                             "use model.device=cpu or auto")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"model.device={spec!r} resolves to cuda:{index}, but torch sees "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"model.device={spec!r}, but MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"model.device={spec!r}: unigrad runs on cpu, cuda or mps")
    return device
