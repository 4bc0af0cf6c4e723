"""User-facing errors: the CLI prints their message (no traceback) and exits with code 2."""

from __future__ import annotations


class RaddinoError(Exception):
    """An error caused by the user's input (config, files, arguments) rather than a bug in raddino."""

    exit_code = 2


class ConfigError(RaddinoError):
    """Unknown key, wrong type or invalid value in a config; the message names the offending key."""
