"""Errors of the training commands: problems the user must fix (exit 2, no traceback)."""

from __future__ import annotations

from etl.errors import PatchetlError


class TrainError(PatchetlError, RuntimeError):
    """A problem the user must fix; the message says what and how."""


class InferError(PatchetlError, RuntimeError):
    """A problem the user must fix; the message names the file and what to do."""
