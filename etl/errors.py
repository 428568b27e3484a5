"""The one error base class: a problem the user must fix.

Every command maps a `PatchetlError` to its message and exit status 2 (no traceback); the
message names the file, the entry and the fix. Subclasses keep a builtin base too
(`ValueError`, `OSError`, ...) so callers that catch those still do.
"""

from __future__ import annotations


class PatchetlError(Exception):
    """A problem with the user's input or options; the message says what and how to fix it."""


class OptionError(PatchetlError, ValueError):
    """An option value that cannot work; the message names the option and the values to use."""
