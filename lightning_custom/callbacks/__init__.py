"""Lightning callbacks: DVAR early stopping, the paper's baselines, live samples and report, and the run summary."""

from lightning_custom.callbacks.checkpoint import StepCheckpoint
from lightning_custom.callbacks.clip_early_stopping import CLIPEarlyStopping
from lightning_custom.dvar.callback import DVAREarlyStopping
from lightning_custom.callbacks.fixed_budget import FixedBudget
from lightning_custom.callbacks.live_samples import LiveReport, LiveSamples
from lightning_custom.callbacks.summary import RunSummary

__all__ = ["CLIPEarlyStopping", "DVAREarlyStopping", "FixedBudget", "LiveReport", "LiveSamples", "RunSummary",
           "StepCheckpoint"]
