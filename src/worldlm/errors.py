"""Errors the CLI turns into one clear line and an exit code instead of a traceback."""


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
