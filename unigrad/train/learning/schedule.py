"""Learning-rate multipliers: `unigrad.models.lr_schedule` (below the trainer, shared with the tiny model's
pretraining), under the name it has always had here."""

from unigrad.models.lr_schedule import lr_multiplier

__all__ = ["lr_multiplier"]
