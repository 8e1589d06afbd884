"""How L_det behaves on the 2026 flow families' tiny models (issue 28, item 3): does DVAR's deterministic loss on the
training images plateau, or fall steadily as public reports say a flow model's does? And a held-out image's?

For each family (Z-Image, FLUX.2 [klein], Qwen-Image) on its embedded tiny model: DreamBooth-LoRA (the quickstart's
settings) on 4 of the 5 ``cat-toy`` images for ``--steps`` steps with DVAR watching but never stopping; every 5 steps
L_det on the fixed batch of the 4 training images (DVAR's own) and on a fixed batch built the same way from the
held-out fifth image. Writes ``<out>/ldet_shape_2026.json`` and ``.png``.

    PYTHONPATH=. python benchmarks/ldet_shape_2026.py --steps 400 --out docs/figures
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

FAMILIES = {"z_image": 32, "flux2": 16, "qwen_image": 32}
EVERY = 5


class HeldOut(Callback):
    """L_det on a held-out image's fixed batch (built once by a second data module), every ``EVERY`` steps."""

    def __init__(self, folder: str, resolution: int):
        self.folder, self.resolution, self.batch, self.history = folder, resolution, None, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        from lightning_custom.data import ConceptDataModule

        step = trainer.global_step
        if step % EVERY:
            return
        if self.batch is None:
            dm = ConceptDataModule(instance_data_dir=self.folder, placeholder_token="sks", class_noun="toy",
                                   resolution=self.resolution, batch_size=2, eval_batch_size=4, repeats=1, seed=59)
            dm.trainer = trainer
            self.batch = dm.build_eval_dataset(module.eval_batch_spec(), 0)[0]
        was_training = module.training
        module.eval()
        with torch.no_grad():
            self.history.append([step, float(module.deterministic_loss(self.batch))])
        module.train(was_training)


def run(family: str, steps: int, work: Path, learning_rate: float) -> dict:
    from lightning_custom.callbacks import DVAREarlyStopping
    from lightning_custom.families.components import embedded_concept_path
    from lightning_custom.data import ConceptDataModule
    from lightning_custom.methods import DreamBoothLoRA

    images = sorted(Path(embedded_concept_path("cat-toy")).glob("*.png"))
    train, held = work / family / "train", work / family / "held"
    for folder, files in ((train, images[:4]), (held, images[4:])):
        folder.mkdir(parents=True, exist_ok=True)
        for file in files:
            shutil.copy(file, folder / file.name)
    L.seed_everything(59)
    module = DreamBoothLoRA(pretrained_model_name_or_path=f"embedded:tiny-{family.replace('_', '-')}",
                            placeholder_token="sks", rank=4, learning_rate=learning_rate)
    dm = ConceptDataModule(instance_data_dir=str(train), placeholder_token="sks", class_noun="toy",
                           resolution=FAMILIES[family], batch_size=2, eval_batch_size=4, repeats=100, seed=59)
    dvar = DVAREarlyStopping(window=80, threshold=1e-12, eval_every_n_steps=EVERY)
    held_out = HeldOut(str(held), FAMILIES[family])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(work / family / "run"), callbacks=[dvar, held_out])
    trainer.fit(module, datamodule=dm)
    return {"train": [[int(step), float(loss)] for step, loss in dvar.history], "held_out": held_out.history}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--learning_rate", type=float, default=1e-2)
    parser.add_argument("--out", default="docs/figures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            results[family] = run(family, args.steps, Path(tmp), args.learning_rate)
            (out / "ldet_shape_2026.json").write_text(json.dumps(results))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2))
    for ax, (family, series) in zip(axes, results.items()):
        for key, style in (("train", "-"), ("held_out", "--")):
            points = series[key]
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=key.replace("_", "-"))
        ax.set_title(f"{family} (tiny, LoRA lr {args.learning_rate:g})")
        ax.set_xlabel("step")
    axes[0].set_ylabel("L_det")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "ldet_shape_2026.png", dpi=100)


if __name__ == "__main__":
    main()
