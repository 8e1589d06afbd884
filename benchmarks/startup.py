"""Time to the first line (issue 27, item 10): how long the commands that load no model take to answer, and how
long a fit takes to its first optimizer step, for this checkout and (``--before``) another one.

    python benchmarks/startup.py --before /tmp/before --out benchmarks/results/startup.md

``--before`` is a checkout of an earlier commit (``git worktree add /tmp/before <commit>``); both run with this
virtual environment, ``--repeats`` times each (the median is reported). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "--help": ["--help"],
    "gather RUNS": ["gather", "benchmarks/results/table1_v2_fleet/probed_runs"],
    "replay --help": ["replay", "--help"],
    "unknown subcommand": ["fitt"],
    "fit --help": ["fit", "--help"],
    "fit: first step (max_steps 1)": ["fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps", "1",
                                      "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "{tmp}"],
}


def seconds(code_root: Path, args: list[str], repeats: int) -> float:
    """Median wall seconds of ``python -m lightning_custom args`` with ``code_root`` first on the path."""
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(code_root))
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lightning_custom", *[a.format(tmp=tmp) for a in args]],
                           cwd=code_root, env=env, capture_output=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, default=None, help="an earlier checkout to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "startup.md")
    args = parser.parse_args(argv)
    roots = {"after": ROOT, **({"before": args.before} if args.before else {})}
    rows = {name: {label: seconds(root, cmd, args.repeats) for label, root in roots.items()}
            for name, cmd in COMMANDS.items()}
    lines = ["# Time to the first line", "", f"`python benchmarks/startup.py` ({args.repeats} runs each, median wall "
             "seconds, this machine's 2 CPU cores shared with other jobs: compare the columns, not other pages).", "",
             "| command | " + " | ".join(roots) + " |", "|---|" + "---|" * len(roots)]
    for name, times in rows.items():
        lines.append(f"| `{name}` | " + " | ".join(f"{times[label]:.2f}" for label in roots) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
