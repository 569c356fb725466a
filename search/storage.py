"""Where the Optuna study lives: a SQLite file in the run directory by default, PostgreSQL by URL."""
from __future__ import annotations

import os
import re

STUDY_NAME = "peft-search"
SQLITE_FILE = "study.sqlite3"


def storage_url(storage: str, run_dir: str) -> str:
    """The SQLAlchemy URL for the spec's `storage` value."""
    if storage == "sqlite":
        return f"sqlite:///{os.path.abspath(os.path.join(run_dir, SQLITE_FILE))}"
    return storage


def open_storage(storage: str, run_dir: str):
    import optuna

    url = storage_url(storage, run_dir)
    # heartbeats let a later `resume` tell a trial whose driver died from one still running
    return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)


def redact_url(url: str) -> str:
    """`scheme://user:secret@host/...` -> `scheme://user:***@host/...`; other strings unchanged."""
    return re.sub(r"(?<=://)([^:/@]*):([^@/]*)@", lambda m: f"{m.group(1)}:***@", url)
