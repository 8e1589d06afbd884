"""The concept data module shared by every method."""

from lightning_custom.data.concept import ConceptDataModule, EvalBatchSpec

__all__ = ["ConceptDataModule", "EvalBatchSpec"]
