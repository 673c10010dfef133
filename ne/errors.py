"""The two errors users see. The CLI prints their message, without a traceback, and exits 2."""


class NeError(Exception):
    """Base class: a message that names the bad value and says how to fix it."""


class ConfigError(NeError):
    """A configuration value is wrong (unknown key, value out of range, unknown model)."""


class DataError(NeError):
    """An input file, corpus or run directory is missing, empty or malformed."""
