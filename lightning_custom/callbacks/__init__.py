"""Lightning callbacks: DVAR early stopping, the paper's baselines and the run summary/export."""

from lightning_custom.callbacks.checkpoint import StepCheckpoint
from lightning_custom.callbacks.clip_early_stopping import CLIPEarlyStopping
from lightning_custom.callbacks.dvar import DVAREarlyStopping
from lightning_custom.callbacks.fixed_budget import FixedBudget
from lightning_custom.callbacks.summary import RunSummary

__all__ = ["CLIPEarlyStopping", "DVAREarlyStopping", "FixedBudget", "RunSummary", "StepCheckpoint"]
