"""Errors the CLI turns into one clear line and an exit code instead of a traceback."""

import difflib
from collections.abc import Iterable


class WorldLMError(Exception):
    """A problem the user can fix (bad config, missing file, unusable data). Exit code 2."""

    exit_code = 2


class ConfigError(WorldLMError):
    """The configuration or the tree it describes is invalid."""


class DataError(WorldLMError):
    """Data is missing, unreadable, too small, or does not match the tokenizer."""


def quoted(value: object) -> str:
    """A user's value inside an error message: quoted, with newlines and control characters escaped, so
    that the message stays one line whatever the config holds."""
    return repr(str(value))


def suggest(key: str, valid: Iterable[str]) -> str:
    """The end of an "unknown name" message: the closest valid name, else all of them."""
    names = list(valid)
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {quoted(close[0])}?)" if close else f" (valid: {', '.join(sorted(names))})"
