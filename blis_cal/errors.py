"""Exceptions the library raises; the CLI turns them into one line and exit code 2."""


class BlisError(Exception):
    """Base class: the message alone must tell the user what to fix (file, line, field, allowed values)."""


class TraceFormatError(BlisError):
    """A TraceV2 header, data CSV or ITL file that cannot be read."""


class ConfigError(BlisError):
    """A bad flag, YAML key or value (unknown key, wrong type, NaN, out of range)."""
