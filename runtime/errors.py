"""Exceptions that carry a user-facing, one-line reason.

The CLI prints ``error: <message>`` for any :class:`EdgeadaptError` and exits non-zero
instead of showing a traceback.
"""

from __future__ import annotations


class EdgeadaptError(Exception):
    """Base class for errors a user can act on; the message is shown as is."""

    exit_code: int = 2


class ConfigError(EdgeadaptError):
    """A config file or override is malformed, unknown or out of range."""


class UnknownNameError(EdgeadaptError):
    """A name (env family, algorithm, profile) is not registered."""


class CheckpointError(EdgeadaptError):
    """A checkpoint is missing, truncated or not an edgeadapt checkpoint."""


class NonFiniteError(EdgeadaptError):
    """An environment or model produced NaN or inf where finite numbers are required."""


class BundleError(EdgeadaptError):
    """A bundle failed verification (hash, signature, schema, compatibility)."""


class MissingExtraError(EdgeadaptError):
    """An optional extra (``pip install 'edgeadapt[bench]'``) is needed and not installed."""
