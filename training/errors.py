"""Errors the training commands raise for user mistakes (one line each, no traceback in the CLI)."""

from hub.errors import MedhubError


class TrainingConfigError(MedhubError):
    """A recipe configuration, task definition or command-line choice that cannot be trained."""


class CheckpointError(MedhubError):
    """A run folder whose checkpoint is missing, unreadable or from another recipe."""
