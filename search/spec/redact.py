"""Secrets kept out of the pickles Ray Tune writes into the run directory.

Ray Tune saves the searcher under RUN_DIR/ray/: inside `tuner.pkl` (at the start) and as `searcher-state-*.pkl`
(during the search). Pickled as they are, both hold the Optuna storage's URL (the password of a
`postgresql://user:password@host/db` storage) and the spec (its `storage:` URL and `tracking.api_key`), since
the searcher decodes parameters with the spec. PeftOptunaSearch pickles itself with `secret_free_dumps`, which
replaces them:

- an Optuna RDBStorage becomes "reopen the storage at this redacted URL": in the process that pickled it, the
  live storage object itself; elsewhere a storage opened at the URL that search.store.storage.saved_storage gives
  (PEFT_SEARCH_STORAGE's for a database, as `report` and `resume` do; a SQLite URL holds no password);
- a SearchSpec keeps everything but its storage URL's password, and a tracking section its API key (`***`).
"""
from __future__ import annotations

import copyreg
import io
import pickle
import weakref
from typing import Any

from search.store.storage import REDACTED, open_storage, redact_url, saved_storage

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

        from search.spec.search_spec import SearchSpec
        from search.spec.sections import TrackingSection

        self._classes = (RDBStorage, SearchSpec, TrackingSection)

    def reducer_override(self, obj: Any):
        storage_class, spec_class, tracking_class = self._classes
        if isinstance(obj, storage_class):
            redacted = redact_url(obj.url)
            _LIVE_STORAGES[redacted] = obj
            return reopen_storage, (redacted,)
        if isinstance(obj, spec_class):
            return _with_state(obj, storage=redact_url(obj.storage))
        if isinstance(obj, tracking_class) and obj.api_key is not None:
            return _with_state(obj, api_key=REDACTED)
        return NotImplemented


def _with_state(obj: Any, **changes: Any):
    """A reduce value that rebuilds `obj` (a frozen dataclass) with `changes` in its fields, without running
    its checks again (the object was checked when it was made)."""
    return copyreg.__newobj__, (type(obj),), {**vars(obj), **changes}


def reopen_storage(redacted_url: str):
    """The storage a secret-free pickle names (see the module docstring)."""
    live = _LIVE_STORAGES.get(redacted_url)
    return live if live is not None else open_storage(saved_storage(redacted_url), "")
