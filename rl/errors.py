"""Errors that end a run with one clear line (printed by `ttsrl`, no traceback).

InputError  something given to the run is wrong (a manifest, a model directory, a run directory, a reward
            service that does not answer): found before anything is written; exit status 2
RunError    the run started and cannot go on meaningfully (a reward dead for several steps, non-finite updates
            in a row, a checkpoint that could not be written, a run that trained on nothing); exit status 1
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, detected before the run writes anything. The message names the file, line and field (or key)."""


class RunError(RuntimeError):
    """The run stopped; the message says why and what is still intact."""
