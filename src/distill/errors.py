"""Exceptions that the CLI turns into one clear line instead of a traceback."""


class DistillError(Exception):
    """A problem the user can fix (bad config, missing data, unreachable endpoint...)."""


class ConfigError(DistillError):
    """The profile config is missing, malformed or has unknown keys / wrong types."""


class DataError(DistillError):
    """The banking77 data could not be found or does not have the expected shape."""
