"""The one exception type that the CLI prints as a single line instead of a traceback."""


class UserInputError(ValueError):
    """Bad user input: a missing folder, an unreadable image, a token that already exists, ...

    The message names the offending file or argument and says how to fix it. ``python -m lightning_custom``
    prints it as ``error: <message>`` and exits with status 2.
    """
