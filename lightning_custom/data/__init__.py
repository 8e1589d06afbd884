"""The concept data module shared by every method."""

from lightning_custom.data.concept import ConceptDataModule
from lightning_custom.dvar.eval_batch import EvalBatchSpec

__all__ = ["ConceptDataModule", "EvalBatchSpec"]
