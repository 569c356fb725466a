"""Where a search keeps what it learns: the Optuna storage (SQLite or PostgreSQL), the remote copy of a run
on shared storage, the run directory's paths and files, trial results as rows, and the keys trials carry."""
from search.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "open_storage": "storage", "study_name": "storage", "StorageError": "storage", "RemoteRun": "remote",
    "prepare_run_dir": "rundir", "trial_dir": "rundir", "trial_rows": "results", "best_trial": "results",
})
