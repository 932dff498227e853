"""Errors of the pipeline: one base, a few subclasses that also inherit the fitting builtin.

Data errors of one input (:class:`InputError` and subclasses) are caught at the task boundary and
recorded in the manifest; anything else is a programming error and propagates.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A job spec or option is invalid; the message names the field and the value."""


class InputError(PipelineError, ValueError):
    """One input (file or archive member) cannot be converted; recorded as a ``failed`` manifest row."""


class DecodeError(InputError):
    """The bytes are not a decodable image (corrupt, truncated, unsupported, or a decompression bomb)."""


class ArchiveError(InputError):
    """An archive cannot be listed or a member cannot be read (corrupt, truncated, unsafe member)."""


class StorageError(PipelineError, OSError):
    """Object storage failed after the storage client's own retries."""


class GroupCollisionError(InputError):
    """Two inputs map to one output group; the second is refused so the first cube is never overwritten."""
