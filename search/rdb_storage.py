"""Optuna's RDBStorage, pickled without the database password.

Ray Tune pickles the searcher, and with it the study's storage, into RUN_DIR/ray/tune (tuner.pkl,
searcher-state-*.pkl); a plain RDBStorage pickles its whole URL. This one pickles the redacted URL and gets the
password back on unpickling: from this process's own storages (a deepcopy), else from PEFT_SEARCH_STORAGE (as
`peft-search report` does). Imported by search.storage.open_storage only: it imports optuna.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import optuna

from search.storage import STORAGE_ENV, redact_url

# redacted URL -> full URL, of the storages this process opened; never written anywhere
_FULL_URLS: Dict[str, str] = {}


class PasswordlessPickleRDBStorage(optuna.storages.RDBStorage):
    """An RDBStorage whose pickle holds `postgresql://user:***@host/db` instead of the password."""

    def __init__(self, url: str, **kwargs: Any):
        super().__init__(url, **kwargs)
        _FULL_URLS[redact_url(self.url)] = self.url

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state["url"] = redact_url(state["url"])
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state, url=full_url(state["url"]))
        super().__setstate__(state)


def full_url(redacted: str) -> str:
    """The full URL behind `redacted`: this process's own, else PEFT_SEARCH_STORAGE's when it names the same
    database; else `redacted` itself, which then fails at its first query with the server's own message."""
    if redacted in _FULL_URLS:
        return _FULL_URLS[redacted]
    from search.storage import storage_url

    env = os.environ.get(STORAGE_ENV)
    if env and redact_url(storage_url(env, "")) == redacted:
        return storage_url(env, "")
    return redacted
