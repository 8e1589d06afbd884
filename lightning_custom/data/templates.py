"""Prompt templates carrying the placeholder, as in Textual Inversion (Gal et al., 2022) and its reference code."""

from __future__ import annotations

import string
from collections.abc import Sequence

from lightning_custom.errors import UserInputError

OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def concept_phrase(placeholder_token: str, class_noun: str | None = None) -> str:
    """The words that stand for the concept in a prompt: ``"<tok>"`` or ``"sks dog"``."""
    return f"{placeholder_token} {class_noun}" if class_noun else placeholder_token


def format_prompt(template: str, phrase: str) -> str:
    """Put ``phrase`` into ``template`` (which holds one ``{}``)."""
    return template.format(phrase)


def check_templates(templates: Sequence[str], argument: str = "--data.prompt_templates") -> None:
    """Refuse an empty list, or a template without exactly one ``{}`` (and no other ``{...}`` field).

    Raises:
        UserInputError: naming ``argument`` and the first bad template.
    """
    if isinstance(templates, str) or not templates:
        raise UserInputError(f"{argument}: give at least one template with one '{{}}' for the placeholder, e.g. "
                             f"['a photo of a {{}}'] (leave it unset for the built-in templates)")
    for template in templates:
        try:
            fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                      if name is not None]
        except ValueError as err:  # a lone '{' or '}'
            raise UserInputError(f"{argument}: {template!r} is not a valid template ({err}); write a literal brace "
                                 f"as '{{{{' or '}}}}'") from None
        if fields != [("", "", None)]:
            raise UserInputError(f"{argument}: {template!r} must hold exactly one '{{}}' for the placeholder and no "
                                 f"other '{{...}}' field (write a literal brace as '{{{{' or '}}}}')")
