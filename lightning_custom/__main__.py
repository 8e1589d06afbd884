"""``python -m lightning_custom fit --config configs/quickstart.yaml``.

``--help``, an unknown subcommand and the commands that only read summaries (``gather``, ``replay``,
``calibrate``) answer without importing torch, Lightning or diffusers (a few seconds on a busy machine).
"""

import sys


def main() -> None:
    from lightning_custom.commands import COMMANDS, LIGHT_COMMANDS, TRAINER_SUBCOMMANDS, subcommand_listing

    argv = sys.argv[1:]
    if argv in (["-h"], ["--help"]):
        from lightning_custom.commands import top_level_help

        print(top_level_help())
        return
    if not argv or (not argv[0].startswith("-") and argv[0] not in (*TRAINER_SUBCOMMANDS, *COMMANDS)):
        print(subcommand_listing(argv[0] if argv else None), file=sys.stderr)
        raise SystemExit(2)
    if argv[0] in LIGHT_COMMANDS:
        from lightning_custom.commands import run_command
        from lightning_custom.errors import BAD_INPUT_EXIT_CODE, UserInputError

        try:
            run_command(argv)
        except UserInputError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(BAD_INPUT_EXIT_CODE) from None
        return
    from lightning_custom.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
