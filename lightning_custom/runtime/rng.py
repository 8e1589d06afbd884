"""The training RNG's saved states: one per rank, under one checkpoint key."""

from __future__ import annotations

import torch

RNG_KEY = "lightning_custom_train_rng"  # the checkpoint entry holding every rank's training-RNG state


def rank_generator_state(states: torch.Tensor | list[torch.Tensor], rank: int) -> torch.Tensor | None:
    """Rank ``rank``'s saved RNG state: ``states`` is one per rank (a bare tensor: rank 0's, older checkpoints).

    ``None`` (keep the fresh seed) for a rank the checkpoint has no state for: resuming on more processes than
    were saved cannot be exact, but giving that rank another rank's state would repeat that rank's noise.
    """
    states = [states] if torch.is_tensor(states) else list(states)
    return states[rank] if rank < len(states) else None
