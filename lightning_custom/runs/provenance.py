"""What a run needs to be reproduced: the model it really used, the seeds, the data settings and the versions.

:func:`run_provenance` adds these fields to ``summary.json``; :class:`RunFolderSaveConfig` writes the CLI's
``config.yaml`` into the run folder even when a logger puts its own copy elsewhere, so
``python -m lightning_custom fit --config RUN/config.yaml`` reproduces the run.
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from typing_extensions import override

CONFIG_FILE = "config.yaml"
VERSIONED_PACKAGES = ("lightning_custom", "torch", "diffusers", "transformers", "peft", "lightning")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
# Hashing the head of each weights file (with its size) tells models apart in milliseconds, even for 5 GB files.
FINGERPRINT_BYTES = 4 * 1024 * 1024


def package_versions(names: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str | None]:
    """The installed version of each package (``None`` where it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def local_model_folder(name_or_path: str, revision: str | None = None) -> Path | None:
    """The folder a model was loaded from: the path itself, an ``embedded`` alias's folder, or the hub cache's
    snapshot (never downloads); ``None`` when it cannot be found locally."""
    from lightning_custom.families.components import resolve_model_path

    try:
        resolved = Path(resolve_model_path(name_or_path)).expanduser()
    except Exception:  # noqa: BLE001 - provenance must never fail a finished run
        return None
    if resolved.is_dir():
        return resolved.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (or not a hub id): no folder to fingerprint
        return None


def weights_fingerprint(folder: str | Path, head_bytes: int = FINGERPRINT_BYTES) -> dict[str, Any]:
    """A short fingerprint of every weights file under ``folder``: sha256 over each file's relative path, size and
    first ``head_bytes`` bytes.

    Returns:
        ``{"sha256": 16 hex digits, "files": number of weights files, "bytes": their total size}``.
    """
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    digest = hashlib.sha256()
    total = 0
    for file in files:
        size = file.stat().st_size
        total += size
        with open(file, "rb") as handle:
            head = hashlib.sha256(handle.read(head_bytes)).hexdigest()
        digest.update(f"{file.relative_to(root).as_posix()}\0{size}\0{head}\n".encode())
    return {"sha256": digest.hexdigest()[:16], "files": len(files), "bytes": total}


def global_seed() -> int | None:
    """The seed ``seed_everything`` set (Lightning keeps it in ``PL_GLOBAL_SEED``), if any."""
    value = os.environ.get("PL_GLOBAL_SEED")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def concept_records(datamodule: Any) -> list[dict[str, Any]]:
    """Every concept the run trained: name, token, class noun and image folder (one entry without a concepts list)."""
    specs = getattr(datamodule, "concept_specs", None)
    if specs:
        from lightning_custom.synthetic.embedded import resolve_instance_dir

        return [{"name": s.name, "placeholder_token": s.placeholder_token, "class_noun": s.class_noun,
                 "instance_data_dir": resolve_instance_dir(s.instance_data_dir)} for s in specs]
    if datamodule is None or not hasattr(datamodule, "instance_data_dir"):
        return []
    return [{"name": "concept", "placeholder_token": getattr(datamodule, "placeholder_token", None),
             "class_noun": getattr(datamodule, "class_noun", None),
             "instance_data_dir": datamodule.instance_data_dir}]


def run_provenance(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """The ``summary.json`` fields that pin the run down: model folder, revision, variant and weights fingerprint;
    the three seeds; the concepts with their class nouns, prompt templates and prior preservation; the versions."""
    hparams = pl_module.hparams
    name = hparams.get("pretrained_model_name_or_path")
    folder = local_model_folder(str(name), hparams.get("revision")) if name else None
    datamodule = getattr(trainer, "datamodule", None)
    data_hparams = getattr(datamodule, "hparams", {}) or {}
    return {
        "model": {
            "name_or_path": name,
            "resolved_path": str(folder) if folder is not None else None,
            "revision": hparams.get("revision"),
            "variant": hparams.get("variant"),
            "weights_fingerprint": weights_fingerprint(folder) if folder is not None else None,
        },
        "seeds": {
            "model": hparams.get("seed"),  # model.init_args.seed: training noise, timesteps and VAE samples
            "eval": getattr(datamodule, "eval_seed", None),  # data.init_args.eval_seed: DVAR's fixed batch
            "data": getattr(datamodule, "seed", None),  # data.init_args.seed: augmentations and shuffling
            "seed_everything": global_seed(),  # e.g. LoRA's initial weights
        },
        "class_noun": getattr(datamodule, "class_noun", None),
        "prompt_templates": list(getattr(datamodule, "templates", []) or []),
        "concepts": concept_records(datamodule),
        "with_prior_preservation": bool(data_hparams.get("with_prior_preservation", False)),
        "class_prompts": list(getattr(datamodule, "class_prompts", []) or []),
        "versions": package_versions(),
    }


class RunFolderSaveConfig(SaveConfigCallback):
    """LightningCLI's config saver that also writes ``config.yaml`` into the run folder (``default_root_dir``).

    Lightning saves the config to ``trainer.log_dir``, which is the logger's version folder when a logger is on;
    ``before_after`` and a rerun with ``fit --config RUN/config.yaml`` look for it beside ``summary.json``.
    ``save_config`` runs on rank 0 only and ``trainer.log_dir`` broadcasts, so the log folder is read in ``setup``,
    where every rank runs: read in ``save_config`` it paired rank 0's broadcast with the other ranks' next
    collective, and every run on 2+ processes (``ddp``, ``fsdp``) hung in setup.
    """

    _log_dir: str | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            self._log_dir = trainer.log_dir  # a broadcast: every rank calls it here
        super().setup(trainer, pl_module, stage)

    @override
    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        summary = next((c for c in trainer.callbacks if type(c).__name__ == "RunSummary"), None)
        folder = Path(getattr(summary, "output_dir", None) or trainer.default_root_dir)
        target = folder / self.config_filename
        logged = Path(self._log_dir or "") / self.config_filename
        if self.save_to_log_dir and target.resolve() == logged.resolve():
            return  # Lightning wrote it there already
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(target), skip_none=False, overwrite=True, multifile=self.multifile)
