"""The exceptions the CLI prints as a single line instead of a traceback, and the exit status of every outcome.

``python -m lightning_custom fit`` ends with one of these statuses, so a scheduler, a shell ``&&`` or a job array
can tell a finished run from one that did not work (``summary.json`` says the same in ``stopped_by``):

====== ==========================================================================================================
status meaning
====== ==========================================================================================================
0      finished: DVAR stopped it (``dvar``), or a limit you set (``max_steps``, ``max_time``, a fixed budget)
2      bad input: one ``error: --the.argument: ...`` line, nothing trained or written
3      ``diverged``: the loss or the weights blew up (only the last healthy weights are exported, under
       ``last_healthy/``)
4      ``non_finite``: a NaN or infinite loss or weight (as for 3)
5      ``not_training``: L_det never moved; nothing reaches the loss
6      ``undertrained``: L_det barely moved before the variance ratio flattened; raise the learning rate
74     the final files could not be written (e.g. a full disk); one line says where the trained weights were kept
130    stopped by Ctrl-C; resumable from ``checkpoints/interrupted.ckpt``
143    stopped by SIGTERM (what SLURM sends before it kills a job); resumable, or its final files complete
====== ==========================================================================================================
"""

from __future__ import annotations

BAD_INPUT_EXIT_CODE = 2
# A run that ended but did not work: a distinct status per reason (sysexits.h leaves 3-63 to programs).
FAILED_RUN_EXIT_CODES: dict[str, int] = {"diverged": 3, "non_finite": 4, "not_training": 5, "undertrained": 6}
FINAL_FILES_EXIT_CODE = 74  # EX_IOERR of sysexits.h
CTRL_C_EXIT_CODE = 130  # 128 + SIGINT: what a shell reports for a process ended by Ctrl-C
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM

EXIT_STATUS_HELP = (
    "Exit status: 0 finished (dvar, max_steps or another limit you set); 2 bad input; 3 diverged; 4 non_finite; "
    "5 not_training; 6 undertrained; 74 the final files could not be written (the weights are kept, one line says "
    "where); 130 Ctrl-C and 143 SIGTERM (resumable from checkpoints/interrupted.ckpt). summary.json's stopped_by "
    "says the same."
)


def exit_code_for(stopped_by: str | None) -> int:
    """The exit status of a fit that ended with ``stopped_by`` (0 for a finished run)."""
    return FAILED_RUN_EXIT_CODES.get(stopped_by or "", 0)


class UserInputError(ValueError):
    """Bad user input: a missing folder, an unreadable image, a token that already exists, ...

    The message names the offending file or argument and says how to fix it. ``python -m lightning_custom``
    prints it as ``error: <message>`` and exits with status 2.
    """


class FinalFilesNotWritten(RuntimeError):
    """The run trained, but its final files (artifacts, ``summary.json``) could not be written.

    The message says in one line what failed and where the trained weights were kept; the CLI prints it as
    ``error: <message>`` and exits with :data:`FINAL_FILES_EXIT_CODE`.
    """

    exit_code = FINAL_FILES_EXIT_CODE
