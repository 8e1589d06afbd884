"""A bad command-line argument reported in one line that names it, instead of jsonargparse's usage dump."""

from __future__ import annotations

import itertools
import re
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from lightning_custom.errors import UserInputError


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad argument in one ``error: --the.argument: ...`` line (exit 2), not a usage dump before it."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a nested parser trying one of several types: its caller decides
            super().error(message, ex)
        raise UserInputError(one_line_parse_error(message)) from ex


def one_line_parse_error(message: str) -> str:
    """jsonargparse's (often multi-line) message as one line that starts with the argument's name.

    For a subclass argument (``--data.init_args.resolution abc``) the line gives the inner problem
    (``--data.resolution: Expected a int. Got value: abc``), not the list of every type that was tried.
    """
    key, lines = _parser_key(message.strip().splitlines())
    for i, line in enumerate(lines):
        problem = re.match(r"(\s*)- Problem with given class_path '([^']+)':", line)
        if problem:
            depth = len(problem.group(1))
            inner = list(itertools.takewhile(lambda text: len(text) - len(text.lstrip()) > depth, lines[i + 1:]))
            inner_key, inner = _parser_key(inner)
            if inner_key:
                key = f"{key}.{inner_key}" if key else inner_key
            else:
                inner = [f"{problem.group(2)}:", *inner]
            lines = inner
            break
    text = " ".join(line.strip() for line in lines if line.strip())
    text = re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", text)
    if len(text) > 300:
        text = text[:297].rstrip() + "..."
    return f"--{key}: {text} (see --help)" if key else f"{text} (see --help)"


def _parser_key(lines: list[str]) -> tuple[str | None, list[str]]:
    """``("data", rest)`` for lines that start with ``Parser key "data":`` (else ``(None, lines)``)."""
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    match = re.match(r'\s*Parser key "([^"]+)":\s*(.*)$', lines[first]) if first is not None else None
    if match is None:
        return None, lines
    return match.group(1), [match.group(2), *lines[first + 1:]]
