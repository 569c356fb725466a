"""search/store/storage.py without a database server: URLs, redaction, PEFT_SEARCH_STORAGE, and the refusal of SQLite
on a network filesystem (from a made-up mounts table, and on this machine's real local tmp dir)."""
import pytest

from search.store.storage import (STORAGE_ENV, StorageError, check_storage, network_filesystem, open_storage,
                                  redact_url, saved_storage, sqlite_network_problem, storage_url, study_name,
                                  url_password)

# a made-up /proc/mounts: local disks, an NFS home, a CIFS share inside it, sshfs, Lustre scratch, a
# mount point with a space (written `\040`), and the local /data mounted over by NFS later
MOUNTS = r"""/dev/vda / ext4 rw,relatime 0 0
proc /proc proc rw 0 0
tmpfs /tmp tmpfs rw 0 0
fileserver:/export/home /home nfs4 rw,vers=4.2 0 0
//winbox/share /home/alice/share cifs rw 0 0
alice@host:/srv /mnt/remote fuse.sshfs rw 0 0
/dev/vdb /mnt/remote-local ext4 rw 0 0
mds@tcp:/scratch /scratch lustre rw 0 0
fileserver:/runs /mnt/my\040runs nfs rw 0 0
/dev/vdc /data xfs rw 0 0
fileserver:/data /data nfs rw 0 0
"""


@pytest.mark.parametrize("path, expected", [
    ("/home/alice/runs/search", "nfs4"),
    ("/home", "nfs4"),
    ("/home/alice/share/runs", "cifs"),           # the longest mount point wins
    ("/mnt/remote/runs", "fuse.sshfs"),
    ("/mnt/remote-local/runs", None),              # a prefix of the name is not a parent directory
    ("/scratch/u/runs", "lustre"),
    ("/mnt/my runs/search", "nfs"),                # octal escapes of /proc/mounts are decoded
    ("/data/runs", "nfs"),                         # the mount on top hides the one below
    ("/tmp/runs", None),
    ("/var/lib/runs", None),
    ("/", None),
])
def test_network_filesystem_takes_the_mount_that_holds_the_path(path, expected):
    assert network_filesystem(path, MOUNTS) == expected


def test_network_filesystem_knows_fuse_programs_apart():
    mounts = "gcs /mnt/bucket fuse.gcsfuse rw 0 0\nenc /mnt/vault fuse.gocryptfs rw 0 0\n"
    assert network_filesystem("/mnt/bucket/runs", mounts) == "fuse.gcsfuse"
    assert network_filesystem("/mnt/vault/runs", mounts) is None   # a local encrypted directory


def test_sqlite_on_nfs_is_refused_with_advice(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    problem = sqlite_network_problem("sqlite", "/home/alice/runs/search", str(mounts))
    assert problem == ("storage: sqlite in /home/alice/runs/search on a network filesystem (nfs4) is unsafe for "
                       "concurrent writers (its file locking is unreliable there); use storage: "
                       "postgresql://USER:PASSWORD@HOST/DB, or --runs-dir on a local disk")
    assert check_storage("sqlite", "/home/alice/runs/search", mounts_path=str(mounts)) == problem
    # an explicit SQLite file is judged by its own directory, wherever the run directory is
    assert "(lustre)" in sqlite_network_problem("sqlite:////scratch/u/study.db", "/tmp/run", str(mounts))
    assert sqlite_network_problem("sqlite:////tmp/study.db", "/home/alice/runs/search", str(mounts)) is None


def test_sqlite_in_this_machines_tmp_dir_is_accepted(tmp_path):
    # the real /proc/mounts: pytest's tmp dir is on a local disk here and in CI
    assert sqlite_network_problem("sqlite", str(tmp_path / "runs" / "not-yet-made")) is None
    assert check_storage("sqlite", str(tmp_path / "run")) is None
    assert not (tmp_path / "run").exists()   # checking creates nothing


def test_sqlite_is_accepted_where_no_mounts_table_exists(tmp_path):
    assert sqlite_network_problem("sqlite", str(tmp_path), str(tmp_path / "no-proc-mounts")) is None


def test_postgres_urls_get_the_installed_driver_and_sqlite_its_file():
    # SQLAlchemy 2.1 would read a bare postgresql:// as psycopg 3, which the `postgres` extra does not install
    assert storage_url("postgresql://u:p@h:5432/db", "/run") == "postgresql+psycopg2://u:p@h:5432/db"
    assert storage_url("postgresql+psycopg2://u:p@h/db", "/run") == "postgresql+psycopg2://u:p@h/db"
    assert storage_url("sqlite", "/runs/x") == "sqlite:////runs/x/study.sqlite3"


def test_study_names_a_search_in_a_shared_database():
    assert study_name("sqlite", "quickstart") == "peft-search"   # one study per run directory's own file
    assert study_name("postgresql://u:p@h/db", "quickstart") == "quickstart"


def test_redaction_and_the_saved_password():
    assert redact_url("postgresql://u:s3cr%40t@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert url_password("postgresql://u:s3cr@h/db") == "s3cr"
    assert url_password("postgresql://u@h/db") is None and url_password("sqlite") is None


def test_saved_storage_takes_the_full_url_from_the_environment():
    saved = "postgresql://u:***@h/db"
    assert saved_storage(saved, {STORAGE_ENV: "postgresql://u:pw@h/db"}) == "postgresql://u:pw@h/db"
    with pytest.raises(StorageError, match=f"set {STORAGE_ENV} to the full URL"):
        saved_storage(saved, {})
    # without a password (peer or .pgpass authentication) the saved URL is the whole URL
    assert saved_storage("postgresql://u@h/db", {}) == "postgresql://u@h/db"
    assert saved_storage("sqlite", {STORAGE_ENV: "postgresql://u:pw@h/db"}) == "sqlite"


def test_the_run_directorys_sqlite_is_written_ahead(tmp_path):
    """WAL + synchronous=NORMAL (search/store/storage.py _write_ahead_log): what keeps Optuna's per-trial commits cheap."""
    import optuna

    storage = open_storage("sqlite", str(tmp_path))
    study = optuna.create_study(storage=storage, study_name="s")
    study.tell(study.ask(), 1.0)
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1   # NORMAL
    # another process's view (a resumed driver, `peft-search report`) sees the committed trial
    assert optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/study.sqlite3").trials[0].value == 1.0


def test_a_new_storage_opened_by_several_processes_at_once_opens_for_all(tmp_path):
    """Optuna creates its tables unguarded: two searches starting on one new database, or a `report` polling a
    search that starts, made one of them fail ("table studies already exists", or a duplicate alembic
    version row: seen in the chaos test). Threads at a barrier reproduce it in every round without the retry."""
    import threading

    for round_ in range(2):
        run_dir = tmp_path / f"round{round_}"
        run_dir.mkdir()
        barrier, errors = threading.Barrier(6), []

        def open_it():
            barrier.wait()
            try:
                open_storage("sqlite", str(run_dir))
            except StorageError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
