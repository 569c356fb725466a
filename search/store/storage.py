"""Where the Optuna study lives: a SQLite file in the run directory by default, PostgreSQL by URL.

The password of a database URL is kept in the driver's memory only: the run directory holds the redacted
URL (spec.yaml, search.json, and Ray Tune's pickles: search/spec/redact.py), and later commands (`peft-search report`,
`resume`) take the full URL from the PEFT_SEARCH_STORAGE environment variable (`saved_storage`).
"""
from __future__ import annotations

import os
import re
import time
from typing import Mapping, Optional

STUDY_NAME = "peft-search"
SQLITE_FILE = "study.sqlite3"
STORAGE_ENV = "PEFT_SEARCH_STORAGE"
# libpq waits forever for a host that drops packets; a search should fail at once with a clear line instead
CONNECT_TIMEOUT_S = 10
CREATE_ATTEMPTS = 4   # opens of a new storage that another process is creating at the same moment (_created_meanwhile)
REDACTED = "***"
# A key whose value is a secret wherever it appears (tracking.api_key, hf_token, a password): by its last word,
# so that num_virtual_tokens or a monkey_patch setting is not one.
_SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|key|password|passwd|pwd|token|secret|credentials?|auth)$",
                         re.IGNORECASE)


def is_secret_key(name: str) -> bool:
    return bool(_SECRET_KEY.search(name))
INSTALL_HINT = "pip install 'peft-search[postgres]'"   # psycopg2, SQLAlchemy's driver for postgresql:// URLs

# Network filesystem types (/proc/mounts) whose byte-range locks SQLite cannot trust between writers (the SQLite
# FAQ: "file locking is broken on many network filesystem implementations"). Not virtiofs (a VM's view of its
# host's disk) nor ocfs2/gfs2 (shared-disk filesystems with a real lock manager).
NETWORK_FS_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs",
    "9p", "davfs", "orangefs", "pvfs2", "panfs", "wekafs", "quobyte",
})
# FUSE mounts are `fuse.<program>`: these programs serve remote or object storage
NETWORK_FUSE_PROGRAMS = frozenset({
    "sshfs", "s3fs", "gcsfuse", "goofys", "rclone", "blobfuse", "blobfuse2", "juicefs", "glusterfs",
    "cephfs", "ceph-fuse", "lustre", "beegfs", "mountpoint-s3", "davfs", "efs",
})


class StorageError(ValueError):
    """The storage cannot be used as asked; the message is one line naming `storage:` or PEFT_SEARCH_STORAGE."""


def is_sqlite(storage: str) -> bool:
    return storage == "sqlite" or storage.startswith("sqlite:")


def storage_url(storage: str, run_dir: str) -> str:
    """The SQLAlchemy URL for the spec's `storage` value."""
    if storage == "sqlite":
        return f"sqlite:///{os.path.abspath(os.path.join(run_dir, SQLITE_FILE))}"
    if storage.startswith("postgresql://"):
        # SQLAlchemy >= 2.1 reads a bare postgresql:// as psycopg 3; the `postgres` extra installs psycopg2
        return "postgresql+psycopg2://" + storage[len("postgresql://"):]
    return storage


def _shown(storage: str, run_dir: str) -> str:
    """The storage as messages name it: the user's URL (redacted), or the run directory's SQLite file."""
    return redact_url(storage_url(storage, run_dir) if storage == "sqlite" else storage)


def study_name(storage: str, search_name: str) -> str:
    """The run directory's own SQLite file holds one study under a fixed name; a database named by URL may hold
    the studies of many searches, so there each is named after its search (`name`), as optuna-dashboard shows."""
    return STUDY_NAME if storage == "sqlite" else search_name


def open_storage(storage: str, run_dir: str):
    """The Optuna RDBStorage (tables created on first use); StorageError, one line, if it cannot connect."""
    import optuna
    import sqlalchemy.exc

    url = storage_url(storage, run_dir)
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            # heartbeats let a later `resume` tell a trial whose driver died from one still running
            opened = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), heartbeat_interval=60,
                                                grace_period=180)
            break
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:   # ImportError: no driver for the URL
            if attempt < CREATE_ATTEMPTS and _created_meanwhile(exc):
                time.sleep(0.2 * attempt)
                continue
            raise StorageError(f"storage: cannot open {_shown(storage, run_dir)}: {_first_line(exc, url)}") from None
    if is_sqlite(url):
        _write_ahead_log(opened.engine)
    return opened


def _created_meanwhile(exc: BaseException) -> bool:
    """Optuna creates its tables and version rows unguarded: where two processes open a new storage at the same
    moment (two searches starting on one database, a `peft-search report` polling a search that starts), one
    fails with "table ... already exists" or a duplicate version row. Opened again, it finds them there."""
    import sqlalchemy.exc

    return isinstance(exc, sqlalchemy.exc.IntegrityError) or (
        isinstance(exc, sqlalchemy.exc.OperationalError) and "already exists" in str(exc))


def _write_ahead_log(engine) -> None:
    """SQLite in WAL mode with synchronous=NORMAL: a commit appends to the log instead of waiting for the whole
    database to reach the disk. Optuna commits every attribute, report and state on its own (some 30 commits a
    trial), and each waited for the disk. A killed driver still loses no committed
    trial (the log is read back on the next open); only a power cut may undo the last commits. Readers
    (`peft-search report` during a search) no longer wait for the writer either."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    engine.dispose()   # connections opened while Optuna created its tables predate the listener


def _engine_kwargs(url: str) -> dict:
    if is_sqlite(url):
        return {}
    # pre_ping: a search holds its connections for hours, and servers drop idle ones
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}


def _first_line(exc: BaseException, url: str) -> str:
    """The driver's own message (psycopg2: `connection to server ... failed: FATAL: password authentication
    failed for user "x"`) on one line, without SQLAlchemy's SQL and background-link lines, and never the password."""
    if isinstance(exc, ImportError):   # no driver for the URL
        return f"{exc}; {INSTALL_HINT}"
    reason = str(getattr(exc, "orig", None) or exc)
    reason = " ".join(part.strip() for part in reason.splitlines() if part.strip()) or type(exc).__name__
    password = url_password(url)
    return reason.replace(password, REDACTED) if password else reason


# A password in a URL: `user:PASSWORD@` (up to the last `@`: SQLAlchemy accepts a `/` in it) or a query parameter
# (`?password=PASSWORD`, which libpq takes too; `?secret_key=...` as object-store URLs of other tools carry keys).
_USERINFO_PASSWORD = re.compile(r"(?<=://)([^:/@]*):(.*)@")
_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:password|passwd|pwd|access_key|secret_key|session_token)=)([^&#]*)")


def redact_url(url: str) -> str:
    """`scheme://user:secret@host/db?password=secret` -> `scheme://user:***@host/db?password=***`; other strings
    unchanged."""
    url = _USERINFO_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", url, count=1)
    return _QUERY_PASSWORD.sub(lambda m: m.group(1) + REDACTED, url)


def url_password(url: str) -> Optional[str]:
    """The password `url` holds (the user part's, else the query's), or None."""
    for pattern in (_USERINFO_PASSWORD, _QUERY_PASSWORD):
        match = pattern.search(url)
        if match and match.group(2):
            return match.group(2)
    return None


def saved_storage(saved: str, environ: Mapping[str, str] = os.environ) -> str:
    """The full storage of a search whose run directory saved `saved` (search.json: redacted).

    PEFT_SEARCH_STORAGE wins when set (it may also reach the same database by another host name); without it a
    redacted password is a StorageError that says what to set."""
    if is_sqlite(saved):
        return saved
    full = environ.get(STORAGE_ENV)
    if full:
        return full
    if url_password(saved) == REDACTED:
        raise StorageError(f"storage: this search's study is in {saved}, whose password is not saved in the run "
                           f"directory; set {STORAGE_ENV} to the full URL (postgresql://USER:PASSWORD@HOST/DB)")
    return saved


def check_storage(storage: str, run_dir: str, search_name: Optional[str] = None,
                  mounts_path: str = "/proc/mounts") -> Optional[str]:
    """One line saying why a new search cannot use `storage` in `run_dir`, or None. Run it before anything starts.

    SQLite: its directory must not be on a network filesystem. A database URL: the server must accept the
    credentials and, given `search_name`, must not hold a study of that name yet (two searches' trials would
    mix in it). Reads only: no table is created, so `validate` may call it too."""
    if is_sqlite(storage):
        problem = sqlite_network_problem(storage, run_dir, mounts_path)
        if problem or storage == "sqlite":   # the run directory's own file is new with the run directory
            return problem
        if not os.path.isfile(storage_url(storage, run_dir)[len("sqlite:///"):]):
            return None   # connecting would create an empty file
    return database_problem(storage, search_name)


def database_problem(storage: str, search_name: Optional[str] = None) -> Optional[str]:
    """Connect to the database URL `storage` once (no pool kept): why it cannot hold the study `search_name`,
    or None."""
    import sqlalchemy

    url = storage_url(storage, "")
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **_engine_kwargs(url))
        try:
            with engine.connect() as connection:
                taken = search_name is not None and _study_exists(connection, search_name)
        finally:
            engine.dispose()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        return f"storage: cannot connect to {redact_url(storage)}: {_first_line(exc, url)}"
    if taken:
        return f"storage: {redact_url(storage)} already holds a study named {search_name!r} (another search); " \
               f"choose another `name`"
    return None


def _study_exists(connection, name: str) -> bool:
    import sqlalchemy

    if not sqlalchemy.inspect(connection).has_table("studies"):   # Optuna's table: none before the first study
        return False
    query = sqlalchemy.text("SELECT 1 FROM studies WHERE study_name = :name")
    return connection.execute(query, {"name": name}).first() is not None


def sqlite_network_problem(storage: str, run_dir: str, mounts_path: str = "/proc/mounts") -> Optional[str]:
    """The refusal line when the SQLite file of `storage` would lie on a network filesystem, else None."""
    path = storage_url(storage, run_dir)[len("sqlite:///"):]
    # symlinks resolved (a run directory linked into NFS is on NFS); the parts not made yet are kept as they are
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    try:
        with open(mounts_path, encoding="utf-8") as handle:
            mounts = handle.read()
    except OSError:  # no /proc (not Linux): nothing to go by
        return None
    fs_type = network_filesystem(directory, mounts)
    if fs_type is None:
        return None
    where = run_dir if storage == "sqlite" else os.path.dirname(os.path.abspath(path))
    return (f"storage: sqlite in {where} on a network filesystem ({fs_type}) is unsafe for concurrent writers "
            f"(its file locking is unreliable there); use storage: postgresql://USER:PASSWORD@HOST/DB, or "
            f"--runs-dir on a local disk")


def network_filesystem(path: str, mounts: str) -> Optional[str]:
    """The filesystem type holding absolute `path`, per a /proc/mounts text, if it is a network one; else None.

    The mount whose point is the longest prefix of `path` holds it; of several at the same point the last
    (the one mounted on top) counts."""
    best_point, best_type = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fs_type = _unescape(fields[1]), fields[2]
        if _within(path, point) and len(point) >= len(best_point):
            best_point, best_type = point, fs_type
    return best_type if best_type is not None and is_network_fs_type(best_type) else None


def is_network_fs_type(fs_type: str) -> bool:
    if fs_type.startswith("fuse."):
        return fs_type[len("fuse."):] in NETWORK_FUSE_PROGRAMS
    return fs_type in NETWORK_FS_TYPES or fs_type.startswith("nfs")


def _within(path: str, point: str) -> bool:
    return point == "/" or path == point or path.startswith(point.rstrip("/") + "/")


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in mount points as octal escapes (`\\040`)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
