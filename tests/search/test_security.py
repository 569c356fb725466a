"""Security (issue 6, item 5), one section per point:

1. YAML is loaded safely: a spec with a Python tag is refused and never run; no unsafe load in the code.
2. Checkpoints and adapters are safetensors, or torch files read with weights_only=True (DeepSpeed's too):
   they round-trip, and a planted pickle is refused, never run.
3. Secrets (a database password in `storage:`, the W&B API key in the spec or in WANDB_API_KEY) appear in
   none of spec.yaml, search.json, trials.csv, report.md/html, the W&B runs, Ray Tune's pickles, the logs
   (a whole search's: test_end_to_end.py).
4. The embedded Ray listens on loopback only.
5. The HTML report escapes the user strings not covered by test_report_html.py.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from trainers.tiny_models import build_tiny_classifier, make_learnable_classification_data

REPO = Path(__file__).resolve().parents[2]
# The product's code and everything shipped beside it that a user runs.
SCANNED = ("search", "trainers", "spaces", "cluster", "benchmarks", "examples", "notebooks")

DB_PASSWORD = "db-Pa55word-7f3a9c"
SPEC_API_KEY = "spec-wandb-key-0123456789abcdef0123456789abcdef"
ENV_API_KEY = "env-wandb-key-fedcba9876543210fedcba9876543210"
SECRETS = (DB_PASSWORD, SPEC_API_KEY, ENV_API_KEY)
POSTGRES_URL = f"postgresql://peft:{DB_PASSWORD}@db.example:5432/studies"
MALICIOUS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    return {"model": build_tiny_classifier(str(root / "bert"), num_labels=2),
            "train": make_learnable_classification_data(str(root / "train.jsonl"), 48, seed=0),
            "eval": make_learnable_classification_data(str(root / "eval.jsonl"), 16, seed=1)}


def spec_dict(world, **changes):
    spec = {
        "name": "secure",
        "model": {"name_or_path": world["model"], "task": "sequence-classification"},
        "data": {"train": world["train"], "eval": world["eval"], "text_field": "text", "label_field": "label",
                 "max_length": 16},
        "peft": {"method": "lora", "target_modules": ["query", "value"]},
        "space": {"r": [2, 4], "learning_rate": [5e-3, 1e-2]},
        "training": {"epochs": 2, "batch_size": 16, "max_steps": 2},
        "objective": {"metric": "eval_accuracy", "mode": "max"},
        "search": {"algorithm": "random", "trials": 2, "concurrency": 2, "scheduler": "none", "seed": 0},
        "resources": {"deepspeed": {"enabled": False}},
        "storage": POSTGRES_URL,
        "tracking": {"wandb": "offline", "api_key": SPEC_API_KEY},
    }
    spec.update(changes)
    return spec


@pytest.fixture
def secret_spec(world):
    from search.spec.search_spec import parse_spec

    return parse_spec(spec_dict(world))


def files_holding(root: Path, secrets=SECRETS):
    """{file: [secrets in it]} for every file under `root` (binary files too: pickles, .wandb, sqlite)."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits = [s for s in secrets if s.encode() in data]
            if hits:
                found[str(path.relative_to(root))] = hits
    return found


def python_sources():
    """(path, source) of every Python file, and every notebook's code, in the SCANNED folders."""
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path, path.read_text(encoding="utf-8")
        for path in sorted((REPO / folder).rglob("*.ipynb")):
            cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
            code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
            # shell and magic lines are not Python
            yield path, "\n".join(line for cell in code for line in cell.splitlines() if not line.lstrip().startswith(("!", "%")))


def calls(tree, module: str):
    """(attribute, call) of every `module.attribute(...)` call in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module:
            yield node.func.attr, node


# ---------------------------------------------------------------------------------------------- 1. YAML

def test_a_spec_with_a_python_tag_is_refused_and_never_run(tmp_path):
    from search.cli import main
    from search.spec.search_spec import SpecError, load_spec

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(SpecError) as caught:
        load_spec(str(path))
    assert "not valid YAML" in caught.value.problems[0]
    assert main(["validate", str(path)]) == 2
    assert not marker.exists()


UNSAFE_YAML_CALLS = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all"}
UNSAFE_YAML_NAMES = {"Loader", "FullLoader", "UnsafeLoader", "CLoader", "CFullLoader", "CUnsafeLoader",
                     *UNSAFE_YAML_CALLS}
SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}


def _unsafe_yaml(tree) -> list:
    problems = []
    for attr, call in calls(tree, "yaml"):
        loader = next((k.value for k in call.keywords if k.arg == "Loader"), None)
        loader_name = getattr(loader, "attr", getattr(loader, "id", None))
        if attr in UNSAFE_YAML_CALLS and loader_name not in SAFE_LOADERS:
            problems.append(f"line {call.lineno}: yaml.{attr} without a safe Loader")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "yaml" \
                and node.attr in UNSAFE_YAML_NAMES - UNSAFE_YAML_CALLS:
            problems.append(f"line {node.lineno}: yaml.{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module == "yaml":
            problems += [f"line {node.lineno}: from yaml import {a.name}" for a in node.names
                         if a.name in UNSAFE_YAML_NAMES]
    return problems


def test_every_yaml_load_in_the_code_base_is_safe():
    found, safe_calls = {}, 0
    for path, source in python_sources():
        tree = ast.parse(source)
        safe_calls += sum(1 for attr, _ in calls(tree, "yaml") if attr == "safe_load")
        safe_calls += sum(1 for node in ast.walk(tree) if isinstance(node, ast.Attribute)   # yaml.SafeLoader
                          and isinstance(node.value, ast.Name) and node.value.id == "yaml" and node.attr in SAFE_LOADERS)
        problems = _unsafe_yaml(tree)
        if problems:
            found[str(path.relative_to(REPO))] = problems
    assert found == {}
    assert safe_calls >= 1   # the scan sees the spec loader (search/spec/yaml_file.py), so it is not scanning nothing


def test_the_yaml_scan_catches_unsafe_loads():
    unsafe = "import yaml\nyaml.load(t, Loader=yaml.Loader)\nyaml.unsafe_load(t)\nyaml.load(t)\nfrom yaml import FullLoader\n"
    assert len(_unsafe_yaml(ast.parse(unsafe))) == 5   # load + its Loader, unsafe_load, bare load, the import
    assert _unsafe_yaml(ast.parse("import yaml\nyaml.safe_load(t)\nyaml.load(t, Loader=yaml.SafeLoader)\n")) == []


# ------------------------------------------------------------------------------------ 2. checkpoints

def _torch_loads_without_weights_only(tree) -> list:
    problems = []
    for attr, call in calls(tree, "torch"):
        weights_only = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
        if attr == "load" and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            problems.append(f"line {call.lineno}: torch.load without weights_only=True")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            problems += [f"line {node.lineno}: from {node.module} import load" for a in node.names if a.name == "load"]
    return problems


def test_every_torch_load_in_the_code_base_is_weights_only():
    found, checked = {}, 0
    for path, source in python_sources():
        tree = ast.parse(source)
        checked += sum(1 for attr, _ in calls(tree, "torch") if attr == "load")
        problems = _torch_loads_without_weights_only(tree)
        if problems:
            found[str(path.relative_to(REPO))] = problems
    assert found == {}
    assert checked >= 3   # optimizer state, RNG state and DeepSpeed's files are read somewhere


def _settings(world, deepspeed=False, stage=2):
    from trainers.settings import (DataSettings, EngineSettings, ModelSettings, PeftSettings, TrainingSettings,
                                   TrialSettings)

    return TrialSettings(
        model=ModelSettings(world["model"], task="sequence-classification"),
        data=DataSettings(world["train"], eval=world["eval"], max_length=16),
        peft=PeftSettings("lora", {"r": 4, "target_modules": ["query", "value"]}),
        training=TrainingSettings(learning_rate=1e-2, epochs=2, batch_size=16),
        engine=EngineSettings(num_threads=1, deepspeed=deepspeed, zero_stage=stage),
    )


class _Stopped(Exception):
    """Stands for ASHA stopping the trial in its first report."""


def _stop_after_round_1(metrics):
    if metrics["round"] == 1:
        raise _Stopped


class _RunsCode:
    """Unpickled by plain pickle, runs `touch marker`; a weights-only load must refuse it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_plain_checkpoint_is_safetensors_and_weights_only_torch_files_and_resumes(world, tmp_path):
    from trainers.recipe import run_trial

    out = tmp_path / "trial"
    with pytest.raises(_Stopped):
        run_trial(_settings(world), _stop_after_round_1, str(out))
    round_dir = out / "checkpoint" / "round-0001"
    names = sorted(p.name for p in round_dir.iterdir())
    assert names == ["adapter.safetensors", "optimizer.pt", "rng-0.pt", "state.json"]
    for name in ("optimizer.pt", "rng-0.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(round_dir / name)) == []
    reports = []
    run_trial(_settings(world), reports.append, str(out), resume_from=str(out))
    assert [r["round"] for r in reports] == [2]
    adapter = sorted(p.name for p in (out / "adapter").iterdir())
    assert "adapter_model.safetensors" in adapter and not [n for n in adapter if n.endswith((".bin", ".pt", ".pkl"))]


@pytest.mark.parametrize("planted", ["optimizer.pt", "rng-0.pt"])
def test_a_pickle_planted_in_a_plain_checkpoint_is_refused_not_run(world, tmp_path, planted):
    from trainers.recipe import run_trial

    out, marker = tmp_path / "trial", tmp_path / "pwned"
    with pytest.raises(_Stopped):
        run_trial(_settings(world), _stop_after_round_1, str(out))
    torch.save(_RunsCode(marker), out / "checkpoint" / "round-0001" / planted)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        run_trial(_settings(world), lambda metrics: None, str(out), resume_from=str(out))
    assert not marker.exists()


def _deepspeed_group(tmp_path, name, settings, jobs, port):
    """Run `jobs` (options of tests/trainers/deepspeed_worker.py: stop_after_round, resume) with `settings` in one
    fresh 1-rank gloo process group; job i works in tmp_path/trial<i> (or trial<resume>)."""
    from trainers.settings_io import settings_to_dict

    paths = []
    for index, options in enumerate(jobs):
        path = tmp_path / f"{name}-{index}.json"
        path.write_text(json.dumps({"settings": settings_to_dict(settings), **options}))
        paths.append(str(path))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(REPO / "tests" / "trainers" / "deepspeed_worker.py"), *paths,
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_deepspeed_checkpoints_are_read_weights_only(world, tmp_path):
    """DeepSpeed's own loader unpickles anything; the engine's weights-only loader reads its real ZeRO-2 files
    (a resume continues) and refuses a planted pickle without running it."""
    pytest.importorskip("deepspeed")
    from cluster.local import free_port

    settings = _settings(world, deepspeed=True, stage=2)
    first = _deepspeed_group(tmp_path, "stop", settings, [{"stop_after_round": 1}, {"stop_after_round": 1}], free_port())
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    optimizer_states = list((tmp_path / "trial1" / "checkpoint" / "round-0001" / "engine").glob("*optim_states.pt"))
    assert len(optimizer_states) == 1
    marker = tmp_path / "pwned"
    torch.save(_RunsCode(marker), optimizer_states[0])
    # trial 0 resumes from its real checkpoint, then trial 1 meets the planted file and the process fails
    second = _deepspeed_group(tmp_path, "resume", settings, [{"resume": 0}, {"resume": 1}], free_port())
    assert (tmp_path / "trial0" / "metrics.json").is_file(), second.stdout[-3000:] + second.stderr[-3000:]
    assert second.returncode != 0 and "Weights only load failed" in second.stdout + second.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- 3. secrets

def _run_dir(spec, tmp_path) -> Path:
    """The run directory's files as `run` writes them (prepare_run_dir would connect to the database first)."""
    from search.store.rundir import RunPlace, run_summary, write_run_files

    run_dir = tmp_path / "runs" / spec.name
    run_dir.mkdir(parents=True)
    write_run_files(spec, str(run_dir), run_summary(spec, RunPlace.of(spec, str(tmp_path / "runs"))))
    return run_dir


def test_the_specs_repr_holds_no_secret(secret_spec):
    """A repr lands in tracebacks and logs."""
    assert not [s for s in SECRETS if s in repr(secret_spec)]


def test_spec_yaml_and_search_json_hold_no_secret(secret_spec, tmp_path):
    run_dir = _run_dir(secret_spec, tmp_path)
    assert files_holding(run_dir) == {}
    saved = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert saved["storage"] == "postgresql://peft:***@db.example:5432/studies"
    assert saved["tracking"]["api_key"] == "***"
    assert json.loads((run_dir / "search.json").read_text())["storage"] == saved["storage"]


def _fill_study(storage_url: str, name: str = "secure") -> None:
    """Trials as the searcher stores them (param_* attributes, metrics, a failure reason), in the study of the
    search `name` (a database's studies are named after their searches)."""
    study = optuna.create_study(storage=storage_url, study_name=name, direction="maximize")
    dist = {"r_log2": CategoricalDistribution([1, 2])}
    for number, (state, value) in enumerate([(TrialState.COMPLETE, 0.75), (TrialState.COMPLETE, 0.5),
                                             (TrialState.FAIL, None)]):
        attrs = {"param_r": 2 ** (1 + number % 2), "eval_accuracy": value, "tokens_per_s": 10.0, "round": 2}
        if state == TrialState.FAIL:
            attrs = {"param_r": 2, "fail_reason": "diverged at step 2 (loss=nan)"}
        study.add_trial(create_trial(state=state, value=value, params={"r_log2": 1 + number % 2},
                                     distributions=dist, user_attrs=attrs))


def test_trials_csv_and_reports_hold_no_secret(secret_spec, tmp_path, monkeypatch):
    """`report` on a PostgreSQL-backed run: the real URL comes from PEFT_SEARCH_STORAGE (a SQLite file stands in
    for the database server here), the run directory keeps only the redacted one."""
    from search.report import outputs

    run_dir = _run_dir(secret_spec, tmp_path)
    stand_in = f"sqlite:///{tmp_path / 'database.sqlite3'}"
    _fill_study(stand_in)
    monkeypatch.setenv("PEFT_SEARCH_STORAGE", stand_in)
    rows = outputs.refresh(str(run_dir), wall_s=1.0)
    assert len(rows) == 3
    assert {"trials.csv", "report.md", "report.html"} <= {p.name for p in run_dir.iterdir()}
    assert files_holding(run_dir) == {}


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B offline, with its own config and cache under tmp_path, and an API key in the environment."""
    wandb = pytest.importorskip("wandb")
    for key in list(os.environ):
        if key.startswith("WANDB_"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", ENV_API_KEY)
    # as tests/search/run/test_tracking.py sets it up: W&B's service process outlives a test, with this environment
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DISABLE_GIT": "true", "WANDB__DISABLE_STATS": "true",
                       "WANDB_BASE_URL": "http://127.0.0.1:9"}.items():   # unreachable, if anything tried
        monkeypatch.setenv(key, value)
    for name in ("CONFIG", "CACHE", "DATA"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / f"wandb-{name.lower()}"))
    yield
    # W&B keeps process-wide state (its settings, with the key, and its service) that later tests would inherit
    wandb.teardown()


def test_wandb_trial_runs_and_summary_hold_no_key(secret_spec, tmp_path, offline_wandb):
    """A trial's run gets what the search gives it (spec.decode's params and spec.tracking), with the key in
    the spec and in WANDB_API_KEY; neither may reach its config or any file W&B writes."""
    from search.run.tracking import WandbTracker, log_tables, start_trial

    run_dir = tmp_path / "run"
    params = secret_spec.decode(secret_spec.default_params(complete=True))
    tracker = start_trial(str(run_dir), secret_spec.name, 0, params, secret_spec.tracking)
    assert isinstance(tracker, WandbTracker)
    config = dict(tracker._run.config)
    assert config["r"] == params["r"] and not any(s in json.dumps(config, default=str) for s in SECRETS)
    tracker.log_round({"round": 1, "eval_accuracy": 0.5})
    tracker.finish({}, "COMPLETE")
    log_tables(str(run_dir), secret_spec.name, secret_spec.tracking, {"trials": [{"number": 0, "param_r": 2}]})
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    assert files_holding(run_dir) == {}


def test_ray_tunes_pickled_searcher_holds_no_secret_and_still_works(secret_spec, tmp_path):
    """tuner.pkl (cloudpickle of the searcher) and searcher-state-*.pkl (its save()) of a search whose storage
    URL has a password and whose spec has an API key."""
    from ray import cloudpickle

    from search.run.searcher import PeftOptunaSearch, make_sampler

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=60, grace_period=180)
    storage.url = POSTGRES_URL   # SQLite takes no password; the URL is all the pickles could leak
    searcher = PeftOptunaSearch(space=secret_spec.search_space(), metric="eval_accuracy", mode="max",
                                sampler=make_sampler("tpe", 0), study_name="s", storage=storage,
                                decode=secret_spec.decode)
    config = searcher.suggest("a")
    tuner_state = cloudpickle.dumps({"search_alg": searcher})
    searcher.save(str(tmp_path / "searcher-state.pkl"))
    assert files_holding(tmp_path) == {} and not any(s.encode() in tuner_state for s in SECRETS)

    back = cloudpickle.loads(tuner_state)["search_alg"]
    assert back._storage is storage           # in this process: the live storage, not a copy
    params = {k: v for k, v in config.items() if k in secret_spec.search_space()}
    assert back._decode(params) == secret_spec.decode(params)
    restored = PeftOptunaSearch(space=secret_spec.search_space(), metric="eval_accuracy", mode="max",
                                sampler=make_sampler("tpe", 0), study_name="s", storage=storage,
                                decode=secret_spec.decode)
    restored.restore(str(tmp_path / "searcher-state.pkl"))
    assert [t.number for t in restored._ot_study.get_trials()] == [0]
    assert restored._decode.__self__.tracking.api_key == "***"


def test_a_pickled_storage_is_reopened_in_a_new_process(tmp_path, monkeypatch):
    """In a new process the pickled storage is reopened at search.store.storage.saved_storage's URL: the SQLite URL
    itself (it holds no password); for a database, PEFT_SEARCH_STORAGE's, or an error naming it (a real
    database server: test_storage_postgres.py)."""
    from search.spec import redact
    from search.store.storage import StorageError

    monkeypatch.delenv("PEFT_SEARCH_STORAGE", raising=False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    _fill_study(url)
    blob = redact.secret_free_dumps(optuna.storages.RDBStorage(url))
    redact._LIVE_STORAGES.clear()             # as in a new driver process
    storage = pickle.loads(blob)
    assert storage.url == url and len(storage.get_all_studies()[0].directions) == 1
    with pytest.raises(StorageError, match="set PEFT_SEARCH_STORAGE to the full URL"):
        redact.reopen_storage("postgresql+psycopg2://peft:***@db.example:5432/studies")


@pytest.mark.parametrize("url", ["postgresql://peft:" + DB_PASSWORD + "@db.example/studies",
                                 "postgresql://peft:pa/ss-" + DB_PASSWORD + "@db.example/studies",
                                 "postgresql://peft:pa@ss-" + DB_PASSWORD + "@db.example/studies",
                                 "postgresql://peft@db.example/studies?password=" + DB_PASSWORD,
                                 "postgresql://peft@db.example/studies?sslmode=require&PWD=" + DB_PASSWORD + "&a=1"])
def test_every_form_of_database_password_is_redacted(url):
    from search.store.storage import redact_url, url_password

    redacted = redact_url(url)
    assert DB_PASSWORD not in redacted and url_password(redacted) == "***"
    assert DB_PASSWORD in url_password(url)   # what error messages are scrubbed of
    assert redacted.split("@")[-1].startswith("db.example/studies")   # the host and database stay readable


# A whole search (Ray Tune, Ray Train, DeepSpeed, W&B offline) with both keys set is checked for them by
# test_end_to_end.py::test_no_key_reaches_the_run_directory_or_the_output, on its search.


# ---------------------------------------------------------------------------------------- 4. Ray

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(processes):
    """(process name, ip, port) of every listening TCP socket of `processes`."""
    import psutil

    found = set()
    for process in processes:
        try:
            name = process.name()
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:   # a worker that exited meanwhile
            continue
    return found


def test_the_embedded_ray_listens_on_loopback_only():
    import time

    import psutil
    import ray
    from ray._private import ray_constants

    from cluster import local

    if ray.is_initialized():
        pytest.skip("Ray is already running in this process")
    me = psutil.Process()
    before = _listening([me])
    flag = ray_constants.ENABLE_RAY_CLUSTER
    started = local.connect(None, 1, 1)
    try:
        assert started and ray.util.get_node_ip_address() == "127.0.0.1"

        @ray.remote
        class Echo:   # a worker process with its own gRPC server
            def ping(self):
                return os.getpid()

        echo = Echo.remote()
        ray.get(echo.ping.remote())
        # the agents start a moment after ray.init returns: wait until they listen too
        deadline, listening = time.time() + 60, set()
        while time.time() < deadline:
            listening = _listening([me, *me.children(recursive=True)]) - before
            names = {name for name, _, _ in listening}
            if {"gcs_server", "raylet"} <= names and any("DashboardAgent" in n for n in names) \
                    and any("RuntimeEnvAgent" in n for n in names):
                break
            time.sleep(1)
        wide = sorted(item for item in listening if item[1] not in LOOPBACK)
        assert wide == [], f"listening beyond loopback: {wide}"
        names = {name for name, _, _ in listening}
        assert {"gcs_server", "raylet"} <= names and any("DashboardAgent" in n for n in names), names
        assert len(listening) >= 6
    finally:
        local.shutdown(started)
    # put back, so that a later ray.init(address=...) to a real cluster finds its routable address
    assert ray_constants.ENABLE_RAY_CLUSTER == flag and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


# ------------------------------------------------------------------------------------- 5. HTML report

def test_run_directory_paths_and_setting_names_are_escaped_in_html():
    """Strings test_report_html.py does not cover: the run directory's path (from --runs-dir) in the reproduce
    command and the adapter line, a searched setting's name in the importances."""
    from search.report.html import build_html
    from search.report.sections import ReportInput
    from search.store.results import best_trial, objectives, trial_rows

    study = optuna.create_study(direction="maximize")
    dist = {"r_log2": CategoricalDistribution([1, 2])}
    for number in range(2):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5 + number / 10, params={"r_log2": 1 + number},
                                     distributions=dist, user_attrs={f"param_{MALICIOUS}": number, "param_r": 2}))
    summary = {"name": "x", "model": "m", "task": "sequence-classification", "method": "lora",
               "metric": "eval_accuracy", "mode": "max", "algorithm": "tpe", "scheduler": "asha", "trials": 2,
               "storage": "sqlite", "baseline": None}
    objs = objectives(summary)
    rows = trial_rows(study.get_trials(), [m for m, _ in objs])
    run_dir = f"/runs/{MALICIOUS}"
    data = ReportInput(run_dir, summary, rows, best_trial(rows, objs), wall_s=1.0,
                       importances={"fanova": {MALICIOUS: 1.0}}, settings_path=f"{run_dir}/best/settings.json",
                       adapter_dir=f"{run_dir}/best")
    html = build_html(data)
    assert "<script" not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3   # reproduce command, adapter line, setting
