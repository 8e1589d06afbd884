"""The training loader's plumbing: a per-epoch shuffle that a resumed run repeats, a loader that counts what it
has served (for an exact resume mid-epoch), and a collate that tokenizes in the loader."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, default_collate


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)``; Lightning calls ``set_epoch`` each epoch."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


class _Progress:
    """Batches consumed by training in the current epoch, shared by a loader and its DDP re-instantiation."""

    def __init__(self) -> None:
        self.consumed = 0
        self.skip = 0


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside an epoch is saved in Lightning checkpoints.

    Lightning stores ``state_dict()`` of stateful train loaders and calls ``load_state_dict`` on resume; the
    next epoch iterator then skips the batches that were already trained on.
    """

    def __init__(self, *args: Any, progress: _Progress | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress if progress is not None else _Progress()

    def __iter__(self):
        iterator = super().__iter__()
        skip, self.progress.skip = self.progress.skip, 0
        self.progress.consumed = skip
        for _ in range(skip):
            next(iterator)
        yield from iterator

    def state_dict(self) -> dict[str, int]:
        """Batches consumed so far in this epoch (``0`` at an epoch boundary)."""
        return {"consumed": self.progress.consumed % max(1, len(self))}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Skip the consumed batches at the next iteration."""
        self.progress.skip = int(state_dict.get("consumed", 0))


def collate_with_token_ids(
    items: list[dict[str, Any]], tokenize: Callable[[list[str]], dict[str, torch.Tensor]] | None = None
) -> dict[str, Any]:
    """``default_collate``, plus the captions' token ids from ``tokenize`` (class captions' as ``class_<key>``).

    Tokenizing here, in the loader (its workers, when it has some), takes it off the training step.
    """
    batch = default_collate(items)
    if tokenize is not None:
        batch.update(tokenize(batch["caption"]))
        if "class_caption" in batch:
            batch.update({f"class_{key}": ids for key, ids in tokenize(batch["class_caption"]).items()})
    return batch
