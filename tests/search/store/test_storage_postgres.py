"""PostgreSQL storage against a real server (tests/search/conftest.py starts one): the study, concurrent writers,
connection errors, and one real search whose run directory must not hold the password anywhere."""
import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml

from search.store.storage import STORAGE_ENV, check_storage, open_storage, redact_url
from trainers.tiny_models import build_tiny_classifier, make_learnable_classification_data

ROOT = Path(__file__).resolve().parents[3]   # the subprocesses import this checkout's `search`
WRITER = textwrap.dedent("""
    import os, sys, time
    import optuna
    from search.store.storage import open_storage

    url, study, writer, count, gate = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    study = optuna.load_study(study_name=study, storage=open_storage(url, "."))
    open(os.path.join(gate, "ready-" + writer), "w").close()
    while not os.path.exists(os.path.join(gate, "go")):   # both writers start together, connections open
        time.sleep(0.05)
    for i in range(count):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
        trial.set_user_attr("writer", writer)
        study.tell(trial, trial.params["x"])
""")


def test_open_storage_creates_a_study_another_connection_sees(postgres_url, tmp_path):
    optuna.create_study(study_name="created", storage=open_storage(postgres_url, str(tmp_path)))
    again = open_storage(postgres_url, str(tmp_path))   # a fresh engine: the study is in the server, not a cache
    assert "created" in optuna.study.get_all_study_names(storage=again)
    assert not os.listdir(tmp_path)   # nothing written next to the run directory


def test_concurrent_writers_both_land(postgres_url, tmp_path):
    optuna.create_study(study_name="concurrent", storage=open_storage(postgres_url, str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, postgres_url, "concurrent", name, "15", str(tmp_path)],
                                env=env, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    deadline = time.monotonic() + 600   # imports alone take minutes on a loaded 2-core machine
    while not all((tmp_path / f"ready-{name}").exists() for name in ("a", "b")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in writers), "a writer did not start"
        time.sleep(0.1)
    (tmp_path / "go").touch()
    for proc in writers:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name="concurrent", storage=open_storage(postgres_url, str(tmp_path))).trials
    assert sorted(t.number for t in trials) == list(range(30))   # no number given twice, none lost
    assert sorted(t.user_attrs["writer"] for t in trials) == ["a"] * 15 + ["b"] * 15
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def test_the_pickled_storage_holds_no_password_and_still_connects(postgres_server, tmp_path):
    """Ray Tune pickles the searcher (and its storage) into RUN_DIR/ray, through search.spec.redact: the pickle must
    not hold the password, and must still reach the database, in this process and in another one."""
    import pickle

    from search.spec.redact import secret_free_dumps

    storage = open_storage(postgres_server.url(), str(tmp_path))
    optuna.create_study(study_name="pickled", storage=storage)
    blob = secret_free_dumps(storage)
    assert postgres_server.password.encode() not in blob and b"peft:***@127.0.0.1" in blob
    assert pickle.loads(blob) is storage   # in this process: the live storage itself
    # another process gets the password from PEFT_SEARCH_STORAGE, as `peft-search report` does
    code = "import pickle, sys, optuna; print(optuna.study.get_all_study_names(pickle.loads(sys.stdin.buffer.read())))"
    env = {**os.environ, STORAGE_ENV: postgres_server.url(),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, env=env, timeout=600)
    assert proc.returncode == 0 and b"pickled" in proc.stdout, proc.stderr[-2000:]


def test_check_storage_accepts_the_server_and_names_each_problem(postgres_server, tmp_path):
    run_dir = str(tmp_path / "run")
    assert check_storage(postgres_server.url(), run_dir, search_name="not-there-yet") is None
    wrong = postgres_server.url(password="wrong-secret-123")
    problem = check_storage(wrong, run_dir)
    assert problem.startswith("storage: cannot connect to postgresql://peft:***@127.0.0.1")
    assert "password authentication failed" in problem and "wrong-secret-123" not in problem
    assert "\n" not in problem
    missing_db = check_storage(postgres_server.url(database="no_such_db"), run_dir)
    assert "no_such_db" in missing_db and "does not exist" in missing_db
    optuna.create_study(study_name="taken", storage=open_storage(postgres_server.url(), run_dir))
    taken = check_storage(postgres_server.url(), run_dir, search_name="taken")
    assert taken == f"storage: {redact_url(postgres_server.url())} already holds a study named 'taken' " \
                    f"(another search); choose another `name`"
    assert not os.path.exists(run_dir)


def test_check_storage_names_a_server_that_is_not_there(tmp_path):
    from cluster.local import free_port

    url = f"postgresql://peft:hidden-pw-42@127.0.0.1:{free_port()}/db"
    problem = check_storage(url, str(tmp_path))
    assert problem.startswith("storage: cannot connect to postgresql://peft:***@127.0.0.1")
    assert "Connection refused" in problem and "hidden-pw-42" not in problem


SEARCH_NAME = "pgsearch"


def _spec(root, storage: str) -> dict:
    """test_end_to_end's small, fast search (tiny BERT, 2 trials at once) with its study in `storage`."""
    model = build_tiny_classifier(str(root / "tiny-bert"), num_labels=2)
    train = make_learnable_classification_data(str(root / "train.jsonl"), 160, seed=1)
    return {
        "name": SEARCH_NAME,
        "model": {"name_or_path": model, "task": "sequence-classification"},
        "data": {"train": train, "text_field": "text", "label_field": "label", "max_length": 32},
        "peft": {"method": "lora", "target_modules": ["query", "value"]},
        "space": {"r": [2, 4], "learning_rate": [5e-3, 1e-2]},
        "training": {"epochs": 2, "batch_size": 16},
        "objective": {"metric": "eval_accuracy", "mode": "max"},
        "search": {"algorithm": "random", "trials": 2, "concurrency": 2, "scheduler": "asha",
                   "evals_per_epoch": 1, "grace_rounds": 1, "seed": 3},
        "resources": {"workers_per_trial": 1, "deepspeed": {"enabled": False}},
        "tracking": {"wandb": "offline"},   # its run files land in the run directory: checked for the password too
        "storage": storage,
    }


def _cli(*args, env_storage=None, timeout=600):
    """`python -m search ARGS` with PEFT_SEARCH_STORAGE set to `env_storage`, or unset."""
    env = {k: v for k, v in os.environ.items() if k != STORAGE_ENV}
    if env_storage is not None:
        env[STORAGE_ENV] = env_storage
    return subprocess.run([sys.executable, "-m", "search", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def pg_run(postgres_server, tmp_path_factory):
    """One real search with its study on the PostgreSQL server: (run_dir, spec_path, completed process)."""
    root = tmp_path_factory.mktemp("pg-e2e")
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(root, postgres_server.url())))
    proc = _cli("run", str(spec_path), "--runs-dir", str(root / "runs"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "runs" / SEARCH_NAME, spec_path, proc


def _csv_rows(run_dir):
    with open(run_dir / "trials.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _files_holding(directory, needle: str):
    """Every file under `directory` (Ray's logs and state, W&B's run files, ...) whose bytes contain `needle`."""
    found = []
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as handle:
                    if needle.encode() in handle.read():
                        found.append(path)
    return found


@pytest.mark.slow
def test_search_on_postgres_keeps_every_trial_in_the_study_and_trials_csv(pg_run, postgres_server):
    run_dir, _, _ = pg_run
    rows = _csv_rows(run_dir)
    assert [int(r["number"]) for r in rows] == [0, 1]
    assert {r["state"] for r in rows} <= {"COMPLETE", "PRUNED", "FAIL"} and "COMPLETE" in {r["state"] for r in rows}
    study = optuna.load_study(study_name=SEARCH_NAME, storage=open_storage(postgres_server.url(), str(run_dir)))
    assert [(t.number, t.state.name) for t in study.trials] == [(int(r["number"]), r["state"]) for r in rows]
    assert json.loads((run_dir / "search.json").read_text())["study"] == SEARCH_NAME
    assert (run_dir / "best" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_search_on_postgres_writes_no_sqlite_file(pg_run):
    run_dir, _, _ = pg_run
    assert not [p for p in run_dir.rglob("*") if p.suffix in (".sqlite3", ".sqlite", ".db")]


@pytest.mark.slow
def test_the_password_is_in_no_file_of_the_run_directory_nor_the_output(pg_run, postgres_server):
    run_dir, _, proc = pg_run
    password = postgres_server.password
    assert (run_dir / "ray").is_dir() and (run_dir / "wandb").is_dir()   # the places that could have copied it
    assert _files_holding(run_dir, password) == []
    assert password not in proc.stdout and password not in proc.stderr
    redacted = redact_url(postgres_server.url())
    assert yaml.safe_load((run_dir / "spec.yaml").read_text())["storage"] == redacted
    assert json.loads((run_dir / "search.json").read_text())["storage"] == redacted


@pytest.mark.slow
def test_report_takes_the_password_from_the_environment(pg_run, postgres_server):
    run_dir, _, _ = pg_run
    before = (run_dir / "trials.csv").read_text()
    os.remove(run_dir / "trials.csv")
    os.remove(run_dir / "report.md")
    proc = _cli("report", str(run_dir), env_storage=postgres_server.url())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "trials.csv").read_text() == before and (run_dir / "report.md").is_file()
    assert postgres_server.password not in proc.stdout + proc.stderr
    assert _files_holding(run_dir, postgres_server.password) == []


@pytest.mark.slow
def test_report_without_the_password_exits_2_naming_the_variable(pg_run):
    run_dir, _, _ = pg_run
    proc = _cli("report", str(run_dir))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and STORAGE_ENV in lines[0] and "postgresql://peft:***@" in lines[0]


@pytest.mark.slow
def test_export_needs_no_password(pg_run, tmp_path):
    run_dir, _, _ = pg_run
    proc = _cli("export", str(run_dir), "--out", str(tmp_path / "adapter"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_second_search_of_the_same_name_is_refused_before_it_starts(pg_run, tmp_path):
    _, spec_path, _ = pg_run
    proc = _cli("run", str(spec_path), "--runs-dir", str(tmp_path / "other-runs"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"already holds a study named '{SEARCH_NAME}'" in proc.stderr
    assert not (tmp_path / "other-runs" / SEARCH_NAME).exists()   # nothing started, nothing written


@pytest.mark.slow
def test_run_with_a_wrong_password_exits_2_before_anything_starts(postgres_server, tmp_path):
    spec = _spec(tmp_path, postgres_server.url(password="not-the-password-77"))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    proc = _cli("run", str(spec_path), "--runs-dir", str(tmp_path / "runs"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "password authentication failed" in proc.stderr and "not-the-password-77" not in proc.stderr
    assert not (tmp_path / "runs").exists()
