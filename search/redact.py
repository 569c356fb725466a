"""Secrets kept out of the pickles Ray Tune writes into the run directory.

Ray Tune saves the searcher twice under RUN_DIR/ray/tune/: inside `tuner.pkl` (at the start) and as
`searcher-state-*.pkl` (during the search, for resuming). Pickled as they are, both hold the Optuna storage's
URL (the password of a `postgresql://user:password@host/db` storage) and the spec (its `storage:` URL and
`tracking.api_key`), since the searcher decodes parameters with the spec. `secret_free_dumps` pickles them
with those replaced:

- an Optuna RDBStorage becomes "reopen the storage at this redacted URL": in the process that wrote it, the
  live storage object; elsewhere (a resumed driver) a new one at the URL in PEFT_SEARCH_STORAGE when that
  URL redacts to the same string (the run directory's convention: search.json holds the redacted URL and
  the environment the real one), else at the redacted URL itself (exact for SQLite, which has no password);
- a SearchSpec keeps everything but its storage URL's password, and a tracking section its API key (`***`).
"""
from __future__ import annotations

import copyreg
import io
import os
import pickle
import weakref
from typing import Any

from search.storage import redact_url

REDACTED = "***"
STORAGE_ENV = "PEFT_SEARCH_STORAGE"   # the full storage URL, for the commands that read a redacted one back

# redacted URL -> the storage pickled in this process, so an in-process round trip gets the same object
_LIVE_STORAGES: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()


def secret_free_dumps(obj: Any) -> bytes:
    """`pickle.dumps(obj)`, with storages, specs and tracking sections pickled without their secrets."""
    buffer = io.BytesIO()
    _SecretFreePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


class _SecretFreePickler(pickle.Pickler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # imported here, not at module level: the classes are looked up once per pickling, not per object
        from optuna.storages import RDBStorage

        from search.spec import SearchSpec
        from search.spec_sections import TrackingSection

        self._classes = (RDBStorage, SearchSpec, TrackingSection)

    def reducer_override(self, obj: Any):
        storage_class, spec_class, tracking_class = self._classes
        if isinstance(obj, storage_class):
            redacted = redact_url(obj.url)
            _LIVE_STORAGES[redacted] = obj
            return reopen_storage, (redacted, obj.heartbeat_interval, obj.grace_period)
        if isinstance(obj, spec_class):
            return _with_state(obj, storage=redact_url(obj.storage))
        if isinstance(obj, tracking_class) and obj.api_key is not None:
            return _with_state(obj, api_key=REDACTED)
        return NotImplemented


def _with_state(obj: Any, **changes: Any):
    """A reduce value that rebuilds `obj` (a frozen dataclass) with `changes` in its fields, without running
    its checks again (the object was checked when it was made)."""
    return copyreg.__newobj__, (type(obj),), {**vars(obj), **changes}


def reopen_storage(redacted_url: str, heartbeat_interval: Any = None, grace_period: Any = None):
    """The storage a secret-free pickle names (see the module docstring)."""
    live = _LIVE_STORAGES.get(redacted_url)
    if live is not None:
        return live
    import optuna

    return optuna.storages.RDBStorage(full_storage_url(redacted_url), heartbeat_interval=heartbeat_interval,
                                      grace_period=grace_period)


def full_storage_url(redacted_url: str) -> str:
    """PEFT_SEARCH_STORAGE where it is the same storage as `redacted_url` (it redacts to it), else `redacted_url`."""
    full = os.environ.get(STORAGE_ENV, "")
    return full if full and redact_url(full) == redacted_url else redacted_url
