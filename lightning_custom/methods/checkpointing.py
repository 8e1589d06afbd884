"""The method base's checkpoint plumbing: the per-rank training RNG, and checkpoints that hold only what trains."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_custom.errors import UserInputError
from lightning_custom.runtime.rng import RNG_KEY, rank_generator_state


class CheckpointedTraining:
    """Mixin of :class:`~lightning_custom.methods.base.PersonalizationModule`: its training RNG (seeded per rank,
    saved and restored with every rank's state) and its checkpoints (trainable weights only, refused in one line
    when they lack one). Expects ``_generator`` and ``_pending_rng_state`` set to ``None`` in ``__init__``."""

    @property
    def generator(self) -> torch.Generator:
        """The training RNG: seeded per rank, saved in checkpoints, never shared with DVAR's fixed batch."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self.hparams.seed + self.global_rank)
            if self._pending_rng_state is not None:
                state = rank_generator_state(self._pending_rng_state, self.global_rank)
                if state is not None:
                    self._generator.set_state(state)
                self._pending_rng_state = None
        return self._generator

    def generator_states(self) -> list[torch.Tensor]:
        """Every rank's training-RNG state, indexed by global rank (call it on all ranks: under DDP it gathers).

        Each rank draws its own noise, timesteps and VAE samples, so an exact resume needs each rank's state back.
        """
        state = self.generator.get_state()
        if self._trainer is None or self.trainer.world_size == 1:
            return [state]
        # Gathered on the module's device: NCCL only moves CUDA tensors. Each row is copied out of the gathered
        # stack: Generator.set_state reads from the start of the storage, so a row view crashes or restores garbage.
        return [row.cpu().clone() for row in self.all_gather(state.to(self.device))]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights (a checkpoint of a full SD model per save would be GBs) and each rank's RNG.

        Lightning calls this on every rank (only rank 0 writes the file), so the ranks' RNG states are gathered.
        """
        trainable = self.trained_weight_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint[RNG_KEY] = self.generator_states()

    def trained_weight_names(self) -> set[str]:
        """The names of the weights this run trains, as its checkpoints store them."""
        from lightning_custom.runtime.strategies import plain_parameter_name  # FSDP prefixes the wrapped blocks' names

        return {plain_parameter_name(name) for name, p in self.named_parameters() if p.requires_grad}

    def check_checkpoint_weights(self, saved: Any) -> None:
        """Refuse, in one line, a checkpoint that lacks weights this run trains.

        Checkpoints leave the frozen model out, so ``strict_loading`` is off, and Lightning would resume from such a
        checkpoint (another method's, another model's) silently with the base weights: a run calling itself resumed
        that is not.

        Args:
            saved: the checkpoint's ``state_dict`` (or its keys).
        """
        trained = self.trained_weight_names()
        missing = sorted(trained - set(saved))
        if missing:
            where = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            raise UserInputError(f"--ckpt_path {where}: the checkpoint lacks {len(missing)} of the {len(trained)} "
                                 f"weights this run trains (e.g. {missing[0]}); it was saved by another method, "
                                 "model or setting")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint holds every trained weight, and restore the training RNG so a resumed run draws the
        same noise as an uninterrupted one, on every rank."""
        if "state_dict" in checkpoint:  # FSDP has taken it out already: its strategy checks it (strategies.py)
            self.check_checkpoint_weights(checkpoint["state_dict"])
        if RNG_KEY in checkpoint:
            states = checkpoint[RNG_KEY]
            saved = 1 if torch.is_tensor(states) else len(states)
            world_size = self.trainer.world_size if self._trainer is not None else 1
            if saved != world_size:
                rank_zero_warn(f"the checkpoint holds the training RNG of {saved} process(es) and this run has "
                               f"{world_size}: the resumed run will not repeat the uninterrupted one exactly")
            self._pending_rng_state = states
            self._generator = None
