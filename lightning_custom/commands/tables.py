"""``gather``: many runs' summaries in one table."""

from __future__ import annotations


def gather(runs: list[str], output: str | None = None) -> list[dict]:
    """Collect the summary.json of many runs (say, one SLURM array task per concept) into one table.

    Args:
        runs: run folders, folders holding run folders, or summary.json files.
        output: also write the table as CSV here.

    Returns:
        One row per run (method, token, stop step, why it stopped, wall time, ...).
    """
    from lightning_custom.runs.gather import gather_table, markdown

    rows = gather_table(list(runs), output)
    print(markdown(rows), end="")
    if output:
        print(f"wrote {output} ({len(rows)} runs)")
    return rows
