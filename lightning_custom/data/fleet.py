"""Batches for a fleet of independent concepts trained side by side (``TextualInversionFleet``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader


class FleetLoader:
    """Yields ``{concept name: batch}`` for the concepts still training, each concept's n-th batch being the n-th
    batch of its own run.

    Every concept has its own loader (its images, its sampler seeded as its own run's). Each concept's epochs are
    its own: when its loader is exhausted, its sampler moves to the next epoch (as Lightning's ``set_epoch`` does
    for a single run) and it starts again. The fleet's own epoch never ends; ``max_steps`` or the stops end it.

    Args:
        loaders: one loader per concept, by name.
        active: the names of the concepts still training (read before every batch).
    """

    def __init__(self, loaders: dict[str, DataLoader], active: Callable[[], list[str]]) -> None:
        self.loaders, self.active = loaders, active

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epochs = {name: -1 for name in self.loaders}
        iterators: dict[str, Iterator[Any]] = {}
        while True:
            batch = {}
            for name in self.active():
                batch[name] = self._next(name, epochs, iterators)
            if not batch:
                return
            yield batch

    def _next(self, name: str, epochs: dict[str, int], iterators: dict[str, Iterator[Any]]) -> Any:
        iterator = iterators.get(name)
        if iterator is not None:
            item = next(iterator, None)
            if item is not None:
                return item
        epochs[name] += 1
        loader = self.loaders[name]
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epochs[name])
        iterators[name] = iter(loader)
        return next(iterators[name])
