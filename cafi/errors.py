"""Errors that stop a run. Per-image problems never raise: they become error rows."""


class CafiError(Exception):
    """Base class: a systemic fault that must fail the job with a clear message."""


class ConfigError(CafiError):
    """A config key is unknown, mistyped or out of range. The message names the key."""


class WeightsError(CafiError):
    """A checkpoint could not be fetched, verified or loaded. The message names model and URI."""


class StorageError(CafiError):
    """The input cannot be listed or the output cannot be written."""
