"""Exceptions raised for bad user input and failed operations.

Every error a user can cause derives from :class:`RLPrunerError`. The CLI prints
its message as one line and exits with code 2, so each message names the input,
the value and the fix.
"""

from __future__ import annotations


class RLPrunerError(Exception):
    """Base class for errors that the CLI reports as one line with exit code 2."""

    exit_code = 2


class InputError(RLPrunerError):
    """A file, option or value given by the user is missing, malformed or out of range."""


class CheckpointError(InputError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


class PolicyError(InputError):
    """A policy file is malformed, out of range, or made for another model."""


class DataError(InputError):
    """A data set path is missing or not in the ImageFolder layout."""


class ConfigError(InputError):
    """A configuration file or override is malformed or invalid."""
