"""``python -m lightning_custom fit --config configs/quickstart.yaml``."""

from lightning_custom.cli import main

if __name__ == "__main__":
    main()
