"""Batches for a fleet of independent concepts trained side by side (``TextualInversionFleet``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader


class FleetLoader:
    """Yields ``{concept name: batch}`` for the concepts still training, each concept's n-th batch being the n-th
    batch of its own run.

    Every concept has its own loader (its images, its sampler seeded as its own run's). Each concept's epochs are
    its own: when its loader is exhausted, its sampler moves to the next epoch (as Lightning's ``set_epoch`` does
    for a single run) and it starts again. The fleet's own epoch never ends; ``max_steps`` or the stops end it.

    A resumed fleet goes on where it stopped: Lightning saves :meth:`state_dict` (the batches consumed, counted
    by the data module as they are trained on, not as they are prefetched) and every concept still training has
    trained on each of them, so each continues at that batch of its own sequence.

    Args:
        loaders: one loader per concept, by name.
        active: the names of the concepts still training (read before every batch).
        progress: the batches consumed so far (shared with the data module, which counts them).
    """

    def __init__(self, loaders: dict[str, DataLoader], active: Callable[[], list[str]], progress: Any) -> None:
        self.loaders, self.active, self.progress = loaders, active, progress

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skip, self.progress.skip = self.progress.skip, 0
        self.progress.consumed = skip
        positions = {name: skip for name in self.loaders}  # the batch each concept draws next
        iterators: dict[str, Iterator[Any]] = {}
        while True:
            batch = {name: self._next(name, positions, iterators) for name in self.active()}
            if not batch:
                return
            yield batch

    def _next(self, name: str, positions: dict[str, int], iterators: dict[str, Iterator[Any]]) -> Any:
        loader, position = self.loaders[name], positions[name]
        positions[name] += 1
        per_epoch = max(1, len(loader))
        if name not in iterators or position % per_epoch == 0:  # a new epoch of this concept's own loader
            _set_sampler_epoch(loader, position // per_epoch)  # as Lightning does at a single run's epoch start
            iterators[name] = iter(loader)
            for _ in range(position % per_epoch):  # resumed mid-epoch
                next(iterators[name])
        return next(iterators[name])

    def state_dict(self) -> dict[str, int]:
        """The batches trained on so far (Lightning saves it in checkpoints)."""
        return {"consumed": self.progress.consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue after the consumed batches at the next iteration."""
        self.progress.skip = int(state_dict.get("consumed", 0))


class FleetEvalDataset:
    """One item: every concept's fixed evaluation batch, ``{"concepts": {name: batch}}``, so that a fleet with a
    batched forward computes every concept's L_det in one forward (``TextualInversionFleet``)."""

    def __init__(self, datasets: dict[str, Any]) -> None:
        self.datasets = datasets

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"concepts": {name: dataset[0] for name, dataset in self.datasets.items()}}
