"""Lightning callbacks: DVAR early stopping and the run summary/export."""

from lightning_custom.callbacks.dvar import DVAREarlyStopping
from lightning_custom.callbacks.summary import RunSummary

__all__ = ["DVAREarlyStopping", "RunSummary"]
