"""A concepts list: several concepts trained in one run (Custom Diffusion's multi-concept setting)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_custom.errors import UserInputError

REQUIRED_FIELDS = ("instance_data_dir", "placeholder_token")
OPTIONAL_FIELDS = ("name", "class_noun", "class_prompt", "class_data_dir", "initializer_token", "repeats")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ConceptSpec:
    """One concept of a concepts list.

    Attributes:
        name: short name; DVAR logs this concept's series as ``dvar_loss/<name>``.
        instance_data_dir: folder of the concept's images.
        placeholder_token: the concept's (modifier) token, e.g. ``"<new1>"``.
        class_noun: class word after the token in prompts ("<new1> cat").
        class_prompt: prompt of the concept's class images (prior preservation).
        class_data_dir: folder of class images; ``None`` generates them with the base model.
        initializer_token: the word this concept's token starts from (Textual Inversion fleets).
        repeats: passes over this concept's images per epoch in a fleet (default: the data module's ``repeats``).
            A fleet concept's batches are its own run's only with its run's ``repeats`` (they set the shuffle).
    """

    name: str
    instance_data_dir: str
    placeholder_token: str
    class_noun: str | None = None
    class_prompt: str | None = None
    class_data_dir: str | None = None
    initializer_token: str | None = None
    repeats: int | None = None


def default_concept_name(placeholder_token: str) -> str:
    """A metric-friendly name from a token: ``"<new1>"`` -> ``"new1"``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", placeholder_token).strip("_") or "concept"


def parse_concepts(value: list[dict[str, Any]] | str, argument: str = "--data.concepts") -> list[ConceptSpec]:
    """Check a concepts list (or the path of a JSON file holding one) and return its concepts.

    Every entry needs ``instance_data_dir`` and ``placeholder_token``; ``name``, ``class_noun``, ``class_prompt``
    and ``class_data_dir`` are optional. Errors are one line and name the entry and the field.
    """
    source = argument
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        source = f"{argument} ({path})"
        try:
            value = json.loads(path.read_text())
        except OSError as err:
            raise UserInputError(f"{argument}: cannot read concepts file {path} ({err.strerror or err})") from err
        except json.JSONDecodeError as err:
            raise UserInputError(f"{argument}: {path} is not valid JSON (line {err.lineno}: {err.msg})") from err
    if not isinstance(value, list) or not value:
        raise UserInputError(f"{source}: expected a non-empty list of concepts, got {type(value).__name__}")
    specs: list[ConceptSpec] = []
    for index, entry in enumerate(value):
        where = f"{source}[{index}]"
        if not isinstance(entry, dict):
            raise UserInputError(
                f"{where}: expected a mapping with {list(REQUIRED_FIELDS)}, got {type(entry).__name__}"
            )
        missing = [f for f in REQUIRED_FIELDS if not entry.get(f)]
        if missing:
            raise UserInputError(f"{where}: missing field(s) {missing} (each concept needs {list(REQUIRED_FIELDS)})")
        unknown = sorted(set(entry) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
        if unknown:
            raise UserInputError(
                f"{where}: unknown field(s) {unknown}; allowed: {list(REQUIRED_FIELDS + OPTIONAL_FIELDS)}"
            )
        values = {k: (str(v) if v is not None else None) for k, v in entry.items() if k != "repeats"}
        if entry.get("repeats") is not None:
            repeats = entry["repeats"]
            if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
                raise UserInputError(f"{where}.repeats: expected a whole number of at least 1, got {repeats!r}")
            values["repeats"] = repeats
        name = values.get("name") or default_concept_name(values["placeholder_token"])
        if not _NAME.match(name):
            raise UserInputError(f"{where}.name: {name!r} may hold only letters, digits, '_', '-' and '.'")
        specs.append(ConceptSpec(**{**values, "name": name}))
    for field in ("name", "placeholder_token"):
        seen = [getattr(s, field) for s in specs]
        repeated = sorted({v for v in seen if seen.count(v) > 1})
        if repeated:
            raise UserInputError(f"{source}: {field} {repeated} used by more than one concept; make them unique")
    return specs
