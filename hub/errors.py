"""Exceptions medhub raises for user mistakes and bad inputs.

Every class derives from :class:`MedhubError`, so the CLI and the HTTP service can turn any of them into one
clear line (or a 4xx JSON body) instead of a traceback. Messages name the input and what was expected.
"""

from __future__ import annotations


class MedhubError(Exception):
    """Base class of every error medhub raises on purpose."""


class UnknownVariantError(MedhubError, KeyError):
    """A variant id that is not in the catalogue."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RepoError(MedhubError):
    """A repository folder or id that is missing, malformed or fails verification."""


class ConversionError(MedhubError):
    """An upstream checkpoint that cannot be converted into a medhub repo."""


class InputError(MedhubError, ValueError):
    """An image, volume or text input that medhub cannot use."""


class UnsupportedFormatError(InputError):
    """Input whose format (by content, not by name) medhub does not read."""


class CorruptFileError(InputError):
    """Input that claims a supported format but cannot be decoded."""


class LimitExceededError(InputError):
    """Input whose declared size exceeds the configured pixel, voxel or byte budget."""
