"""Failures of one trial that the search records as FAIL, with a reason a person can act on."""
from __future__ import annotations


class TrialFailed(Exception):
    """The trial cannot finish; `.reason` is one line such as `diverged at step 12 (loss=nan)`.

    Raised for outcomes of the sampled configuration (divergence, out of memory), not for bugs:
    the search keeps going and stores the reason in trials.csv's `fail_reason`.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
