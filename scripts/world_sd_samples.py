"""Sample a grid from a world-sd model folder and measure the bar on those samples.

    python scripts/world_sd_samples.py lightning_custom/assets/world-sd --n 32 \
        --out benchmarks/results/world_sd/samples.png

Writes the grid (prompts as row labels, every 8th prompt shown) and ``<out>.json`` with the bar per attribute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    """Sample, judge, write."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--label", default="", help="e.g. the training step, recorded in the json")
    parser.add_argument("--out", default="benchmarks/results/world_sd/samples.png")
    args = parser.parse_args(argv)

    from lightning_custom.inference.grid import labelled_grid, write_png
    from lightning_custom.inference.sampling import generate
    from lightning_custom.synthetic.world_encoder import WorldEncoder, attribute_accuracy, judge
    from lightning_custom.world.model import IMAGE_SIZE, bar_prompts, load_world_pipeline

    pipe = load_world_pipeline(args.model)
    pairs = bar_prompts(args.n, seed=args.seed)
    images = generate(pipe, [p for p, _ in pairs], list(range(args.n)), guidance_scale=args.guidance,
                      num_inference_steps=args.steps, height=IMAGE_SIZE, width=IMAGE_SIZE, batch_size=32)
    bar = attribute_accuracy(judge(WorldEncoder.load(), images), [a for _, a in pairs])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = [" | ".join(p for p, _ in pairs[i : i + 8]) for i in range(0, args.n, 8)]
    write_png(labelled_grid(images, labels, columns=8, cell=64), out)
    record = {"model": args.model, "label": args.label, "n": args.n, "steps": args.steps, "guidance": args.guidance,
              "bar": bar, "prompts": [p for p, _ in pairs]}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({"label": args.label, "bar": bar}))


if __name__ == "__main__":
    main()
