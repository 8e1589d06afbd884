"""Many Textual Inversion concepts in one process, each trained exactly as in a run of its own (issue 24).

Textual Inversion concepts are independent: the model is frozen and each concept owns only its vectors. So one
process can hold the model once and train many concepts side by side. Each concept keeps what its own run would
have: its token (and vectors in every text encoder that takes one), its training RNG, its optimizer state (one
parameter per concept, so AdamW's step count and moments are its own) and its batches. The loss of a step is the
sum over concepts of each concept's mean loss, so a concept's gradient is the one its own run gets on the same
samples: to the bit with ``forward="per_concept"`` (each concept's forward alone, with a single run's shapes);
with ``forward="batched"`` (the default: one forward over every concept's samples, much faster for many concepts)
up to the last bits a batched matmul rounds differently (a relative 1e-6 on the tiny model).

A concept that stops (:meth:`TextualInversionFleet.freeze_concept`) keeps its vectors from then on: they leave the
optimizer's work (no gradient: AdamW skips them) and its samples leave the batch, so the steps get cheaper.

The per-concept stops live in ``lightning_custom.dvar.fleet_stops`` (used by ``DVAREarlyStopping``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_custom.data.concepts_list import ConceptSpec, parse_concepts
from lightning_custom.runtime.rng import rank_generator_state
from lightning_custom.methods.textual_inversion import LEARNED_EMBEDS, TextualInversion
from lightning_custom.methods.tokens import CaptionTokenizer, expand_placeholder, learn_new_token
from lightning_custom.methods.token_files import embedding_state, token_slots, write_token_files


FLEET_RNG_KEY = "lightning_custom_fleet_rng"


class TextualInversionFleet(TextualInversion):
    """Textual Inversion for several independent concepts at once (see the module docstring).

    Training batches are ``{concept name: that concept's batch}`` (``ConceptDataModule`` serves them to a fleet);
    the step's loss is ``sum over active concepts of mean loss``.

    Args:
        concepts: the concepts list (``concepts.json`` format: ``name``, ``instance_data_dir``,
            ``placeholder_token`` and an optional ``initializer_token`` per concept), or the path of its file;
            give the data module the same list.
        initializer_token: the initializer of concepts that name none.
        num_vectors: vectors per concept in each CLIP encoder.
        t5_num_vectors: FLUX and SD3: vectors per concept in T5.
        forward: ``"batched"``: one forward over every active concept's samples (fast); ``"per_concept"``: one
            forward per concept with a single run's shapes (gradients equal to its own run's to the bit).
        **kwargs: see :class:`~lightning_custom.methods.base.PersonalizationModule`.
    """

    trains_a_fleet = True

    def __init__(self, concepts: list[dict[str, Any]] | str, initializer_token: str = "object", num_vectors: int = 1,
                 t5_num_vectors: int = 0, forward: Literal["batched", "per_concept"] = "batched",
                 **kwargs: Any) -> None:
        self.forward_mode = forward
        self.concept_specs: list[ConceptSpec] = parse_concepts(concepts, "--model.concepts")
        self.active_concepts: list[str] = [spec.name for spec in self.concept_specs]
        self.failed_concepts: set[str] = set()
        super().__init__(placeholder_token=self.concept_specs[0].placeholder_token,
                         initializer_token=initializer_token, num_vectors=num_vectors,
                         t5_num_vectors=t5_num_vectors, **kwargs)

    # ------------------------------------------------------------------------------------------- trainables
    def configure_trainable(self) -> None:
        """One :class:`TokenVectors` per concept and text encoder, each concept's token added to every tokenizer."""
        self.token_slots = token_slots(
            self.family, self, with_t5=self.t5_num_vectors > 0, argument="--model.t5_num_vectors",
            source=str(self.hparams.pretrained_model_name_or_path),
        )
        self.concept_vectors = nn.ModuleDict()
        self.names_by_concept: dict[str, dict[str, list[str]]] = {}
        self._splice_handles = []
        for i, spec in enumerate(self.concept_specs):
            per_slot, names_by_tokenizer = nn.ModuleList(), {}
            for slot in self.token_slots:
                count = self.t5_num_vectors if slot.is_t5 else self.num_vectors
                names, vectors = learn_new_token(
                    getattr(self, slot.tokenizer), getattr(self, slot.text_encoder), spec.placeholder_token,
                    spec.initializer_token or self.initializer_token, count,
                    argument_prefix=f"--model.concepts[{i}]",
                    num_vectors_argument="t5_num_vectors" if slot.is_t5 else "num_vectors", where=slot.where,
                )
                names_by_tokenizer[slot.tokenizer] = names
                per_slot.append(vectors)
                self._splice_handles += vectors.attach_to(getattr(self, slot.text_encoder))
            self.concept_vectors[spec.name] = per_slot
            self.names_by_concept[spec.name] = names_by_tokenizer
            if i == 0:  # the random state a single run is in once its token is added (resizing draws new rows)
                self.rng_after_one_concept = torch.get_rng_state()
        first = self.concept_specs[0].name
        self.names_by_tokenizer = self.names_by_concept[first]
        self.placeholder_names = self.names_by_tokenizer[self.token_slots[0].tokenizer]
        self.placeholder_tokens = [spec.placeholder_token for spec in self.concept_specs]
        self._concept_generators: dict[str, torch.Generator] = {}
        self._pending_concept_rng: dict[str, Any] = {}

    @property
    def token_vector_modules(self) -> list[Any]:
        """Every concept's vectors (all slots), in concept order."""
        return [vectors for per_slot in self.concept_vectors.values() for vectors in per_slot]

    def concept_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable vectors of concept ``name`` (one tensor per text encoder)."""
        return [vectors.vectors for vectors in self.concept_vectors[name]]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every concept's vectors, one parameter per concept and encoder (so each has its own AdamW state)."""
        return [p for name in self.concept_vectors for p in self.concept_parameters(name)]

    def freeze_concept(self, name: str, failed: bool = False) -> None:
        """Stop training concept ``name``: its vectors keep their values and its samples leave the batch.

        Args:
            name: the concept.
            failed: it diverged or went NaN: its broken vectors are not exported.
        """
        if failed:
            self.failed_concepts.add(name)
        if name in self.active_concepts:
            self.active_concepts.remove(name)
        for param in self.concept_parameters(name):
            param.requires_grad_(False)
            param.grad = None

    # --------------------------------------------------------------------------------------------- captions
    def _rewrite(self, captions: list[str], tokenizer_name: str) -> list[str]:
        for spec in self.concept_specs:
            names = self.names_by_concept[spec.name].get(tokenizer_name, [spec.placeholder_token])
            captions = expand_placeholder(list(captions), spec.placeholder_token, names)
        return captions

    def prepare_captions(self, captions: list[str]) -> list[str]:
        """Expand every concept's multi-vector placeholder into its (CLIP) tokens."""
        return self._rewrite(captions, self.token_slots[0].tokenizer)

    def captions_for(self, tokenizer_name: str, captions: list[str]) -> list[str]:
        """``captions`` with every concept's placeholder written out as ``tokenizer_name``'s tokens."""
        return self._rewrite(captions, tokenizer_name)

    def caption_tokenizer(self) -> CaptionTokenizer:
        """The data loader's tokenizer, expanding every concept's placeholder per tokenizer."""
        from functools import partial

        names = self.family.present_tokenizers(self)
        rewrites = [partial(self._rewrite, tokenizer_name=n) for n in names]
        return CaptionTokenizer(self.tokenizers, rewrites, [self.token_max_length(t) for t in self.tokenizers])

    # ----------------------------------------------------------------------------------------------- training
    def concept_generator(self, name: str) -> torch.Generator:
        """Concept ``name``'s training RNG, seeded as its own run's (``seed + global rank``); a resumed run
        continues it from the checkpoint."""
        generator = self._concept_generators.get(name)
        if generator is None or generator.device != self.device:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(self.hparams.seed + self.global_rank)
            pending = self._pending_concept_rng.pop(name, None)
            state = rank_generator_state(pending, self.global_rank) if pending is not None else None
            if state is not None:
                generator.set_state(state)
            self._concept_generators[name] = generator
        return generator

    def setup(self, stage: str) -> None:
        """Under DDP, let the ranks find the parameters a step did not use: a stopped concept's vectors get no
        gradient from then on (DDP would otherwise stop the run at the first step after a concept stopped)."""
        super().setup(stage)
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy):
            strategy._ddp_kwargs["find_unused_parameters"] = True

    def trained_weight_names(self) -> set[str]:
        """Every concept's vectors, stopped ones included: a resumed fleet exports what each concept learned."""
        return {name for name, _ in self.named_parameters() if name.startswith("concept_vectors.")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The base checkpoint, plus every concept's training RNG on every rank."""
        super().on_save_checkpoint(checkpoint)
        states = {}
        for spec in self.concept_specs:
            state = self.concept_generator(spec.name).get_state()
            if self._trainer is not None and self.trainer.world_size > 1:
                states[spec.name] = [row.cpu().clone() for row in self.all_gather(state.to(self.device))]
            else:
                states[spec.name] = [state]
        checkpoint[FLEET_RNG_KEY] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the base state and every concept's training RNG."""
        super().on_load_checkpoint(checkpoint)
        self._pending_concept_rng = dict(checkpoint.get(FLEET_RNG_KEY, {}))
        self._concept_generators = {}

    def concept_losses(self, batch: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Each active concept's mean training loss; every concept draws its VAE sample, noise and noise levels
        from its own RNG in its own run's order."""
        names = [name for name in self.active_concepts if name in batch]
        if self.forward_mode == "per_concept":
            losses = {}
            for name in names:
                self._generator = self.concept_generator(name)  # training_loss draws from self.generator
                try:
                    with self.samples_of([name] * batch[name]["pixel_values"].shape[0]):
                        losses[name] = self.training_loss(batch[name])
                finally:
                    self._generator = None
            return losses
        draws = []
        for name in names:
            self._generator = self.concept_generator(name)  # training_draws draws from self.generator
            try:
                draws.append(self.training_draws(batch[name]))
            finally:
                self._generator = None
        joined = concatenate_batches([batch[name] for name in names])
        sizes = [d[0].shape[0] for d in draws]
        with self.samples_of([name for name, size in zip(names, sizes) for _ in range(size)]):
            per_sample = self.denoising_loss(torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws]),
                                             torch.cat([d[2] for d in draws]), self.unet_conditioning(joined),
                                             reduction="none")
        return {name: part.mean() for name, part in zip(names, torch.split(per_sample, sizes))}

    def samples_of(self, names: list[str]) -> contextlib.AbstractContextManager:
        """Inside the block, sample ``i`` of every forward belongs to concept ``names[i]``. Textual Inversion needs
        nothing (each caption holds its concept's token); a fleet with per-concept weights in the denoiser routes
        each sample through its concept's (``DreamBoothLoRAFleet``)."""
        return contextlib.nullcontext()

    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> torch.Tensor:
        """The sum over concepts of each concept's mean loss (each concept's gradient is its own run's)."""
        losses = self.concept_losses(batch)
        self.last_concept_losses = {name: loss.detach() for name, loss in losses.items()}
        total = torch.stack(list(losses.values())).sum()
        self.log_training_losses({"train_loss": total}, sum(b["pixel_values"].shape[0] for b in batch.values()))
        return total

    @property
    def evaluates_concepts_together(self) -> bool:
        """With the batched forward, every concept's L_det comes from one forward over all their fixed batches (the
        data module then serves them as one batch)."""
        return self.forward_mode == "batched"

    @torch.no_grad()
    def concept_deterministic_losses(self, batches: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
        """L_det of every active concept in ``batches`` (name -> its fixed batch), from one forward."""
        names = [name for name in self.active_concepts if name in batches]
        if not names:
            return {}
        latents = [self._eval_cached("latents", batches[n].get("latents_cache_key"),
                                     lambda b=batches[n]: self.encode_latents(b["pixel_values"], b["latent_noise"]))
                   for n in names]
        joined = concatenate_batches([{k: v for k, v in batches[n].items() if not isinstance(v, str)}
                                      for n in names])
        sizes = [part.shape[0] for part in latents]
        with self.samples_of([name for name, size in zip(names, sizes) for _ in range(size)]):
            conditioning = self.unet_conditioning(joined, self.encode_text(joined["caption"]))
            latents_all = torch.cat(latents)
            per_sample = self.denoising_loss(latents_all, joined["noise"].to(latents_all), joined["timesteps"],
                                             conditioning, reduction="none")
        return {name: part.mean() for name, part in zip(names, torch.split(per_sample, sizes))}

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor | None:
        """L_det of each concept still training, as ``dvar_loss/<name>`` (a stopped concept's is no longer
        computed); with every concept's batch at once (``evaluates_concepts_together``) from one forward."""
        if "concepts" in batch:
            for name, loss in self.concept_deterministic_losses(batch["concepts"]).items():
                self.log(f"dvar_loss/{name}", loss, prog_bar=True, sync_dist=True, batch_size=1,
                         add_dataloader_idx=False, logger=False)  # DVAREarlyStopping logs it at its step
            return None
        name = batch.get("concept") or self.concept_specs[0].name  # a fleet of one: the data module names none
        if name not in self.active_concepts:
            return None
        with self.samples_of([name] * batch["noise"].shape[0]):
            loss = self.deterministic_loss(batch)
        self.log(f"dvar_loss/{name}", loss, prog_bar=True, sync_dist=True, batch_size=1, add_dataloader_idx=False,
                 logger=False)  # DVAREarlyStopping logs it at its step
        return loss

    # ----------------------------------------------------------------------------------------------- export
    def concept_embeddings(self, name: str) -> dict[str, torch.Tensor]:
        """Concept ``name``'s vectors in one dict (see ``TextualInversion.learned_embeddings``)."""
        spec = next(s for s in self.concept_specs if s.name == name)
        vectors = [vectors.vectors for vectors in self.concept_vectors[name]]
        return embedding_state(self.token_slots, vectors, spec.placeholder_token)

    def single_run_weights(self, name: str) -> dict[str, torch.Tensor]:
        """Concept ``name``'s vectors on the CPU under the parameter names of its own run (``TextualInversion``'s
        ``token_vectors.vectors``...), so that a snapshot taken in a fleet loads into a single run's module."""
        return {f"{slot.vectors_attribute}.vectors": vectors.vectors.detach().to("cpu", copy=True).contiguous()
                for slot, vectors in zip(self.token_slots, self.concept_vectors[name])}

    def export_concept(self, name: str, output_dir: Path) -> list[str]:
        """Write concept ``name``'s ``learned_embeds.safetensors`` into ``output_dir`` (loads with
        ``pipe.load_textual_inversion``), as its own run would."""
        spec = next(s for s in self.concept_specs if s.name == name)
        return write_token_files(output_dir, self.token_slots, [v.vectors for v in self.concept_vectors[name]],
                                 spec.placeholder_token, LEARNED_EMBEDS)

    def export_artifacts(self, output_dir: Path) -> list[str]:
        """One folder per concept, each with what its own run writes (nothing for a concept that diverged or went
        NaN: its summary says why)."""
        written = []
        for spec in self.concept_specs:
            folder = Path(output_dir) / spec.name
            folder.mkdir(parents=True, exist_ok=True)
            if spec.name not in self.failed_concepts:
                written += [f"{spec.name}/{name}" for name in self.export_concept(spec.name, folder)]
        return written


def concatenate_batches(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch of the concepts' batches, sample after sample: tensors concatenated, lists joined."""
    joined: dict[str, Any] = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        joined[key] = torch.cat(values) if torch.is_tensor(values[0]) else [v for value in values for v in value]
    return joined
