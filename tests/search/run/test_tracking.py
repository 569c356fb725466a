"""search/run/tracking.py: W&B trial tracking, offline only (never touches the network)."""

import glob
import json
import logging
import os
import struct
import time
import zlib

import pytest

from search.run import tracking as tr

wandb = pytest.importorskip("wandb")

SECRET = "sk-test-SECRET-0123456789abcdef0123456789abcdef"

ROUNDS = [
    {"round": 1, "rounds_total": 2, "step": 50, "epoch": 0.5, "train_loss": 1.25, "eval_loss": 1.5,
     "eval_accuracy": 0.61, "tokens_per_s": 1234.5, "peak_mem_mb": 2048.0, "train_s": 10.0,
     "energy_j": None, "trainable_params": 294912},
    {"round": 2, "rounds_total": 2, "step": 100, "epoch": 1.0, "train_loss": 0.75, "eval_loss": 0.9,
     "eval_accuracy": 0.72, "tokens_per_s": 1300.0, "peak_mem_mb": 2100.0, "train_s": 20.0,
     "energy_j": 512.0, "trainable_params": 294912, "adapter_mb": 1.2,
     "answers": [{"prompt": "p", "reference": "r", "answer": "a"}]},
]


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("WANDB_"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")   # unreachable if anything tried
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


# --------------------------------------------------------------------------- .wandb reader

def read_records(path):
    """Records of a .wandb file (leveldb-log framing: 7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    block, header, pos = 32768, 7, 7
    records, pending = [], b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:            # block trailer padding
            pos += left
            continue
        crc, length, rtype = struct.unpack("<IHB", data[pos:pos + header])
        if length == 0 and rtype == 0:
            pos += left
            continue
        payload = data[pos + header:pos + header + length]
        assert len(payload) == length, "truncated record"
        assert crc == zlib.crc32(bytes([rtype]) + payload) & 0xFFFFFFFF, "bad record checksum"
        pos += header + length
        if rtype == 1:               # FULL
            chunks = [payload]
        elif rtype == 2:             # FIRST
            pending = payload
            continue
        elif rtype == 3:             # MIDDLE
            pending += payload
            continue
        else:                        # LAST
            chunks = [pending + payload]
            pending = b""
        record = pb.Record()
        record.ParseFromString(chunks[0])
        records.append(record)
    return records


def parse_run(run_dir, wait_s=30.0):
    """Everything logged to the single offline run under run_dir/wandb.

    W&B's service process writes the .wandb file; on a loaded machine (CI at load 30) its records were seen
    to land after `finish()` returned, so the file is read again until its run record is there."""
    deadline = time.time() + wait_s
    while True:
        try:
            out = _parse_run_once(run_dir)
        except AssertionError:   # a record half written
            if time.time() > deadline:
                raise
            out = {"run": None}
        if out["run"] is not None or time.time() > deadline:
            return out
        time.sleep(0.5)


def _parse_run_once(run_dir):
    paths = glob.glob(os.path.join(str(run_dir), "wandb", "offline-run-*", "*.wandb"))
    assert paths, f"no offline run under {run_dir}/wandb: {os.listdir(str(run_dir))}"
    out = {"run": None, "config": {}, "history": [], "summary": {}, "paths": paths}
    for path in paths:
        for rec in read_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out["run"] = rec.run
                for item in rec.run.config.update:
                    out["config"][item.key] = json.loads(item.value_json)
            elif kind == "config":
                for item in rec.config.update:
                    out["config"][item.key] = json.loads(item.value_json)
            elif kind == "history":
                row = {}
                for item in rec.history.item:
                    _put(row, item)
                row["__step"] = rec.history.step.num
                out["history"].append(row)
            elif kind == "summary":
                for item in rec.summary.update:
                    _put(out["summary"], item)
    return out


def _put(target, item):
    """Store a history/summary item, nesting flattened ``nested_key`` paths (e.g. trials/_type)."""
    keys = [item.key] if item.key else list(item.nested_key)
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


def all_files(root):
    for dirpath, _, files in os.walk(str(root)):
        for name in files:
            yield os.path.join(dirpath, name)


# --------------------------------------------------------------------------- tests

def test_run_id_is_deterministic():
    assert tr.run_id("my-search", 7) == tr.run_id("my-search", 7)
    assert tr.run_id("my-search", 7) != tr.run_id("my-search", 8)
    assert tr.run_id("my-search", 7) != tr.run_id("other", 7)
    assert tr.run_id("My Search!", 7).startswith("my-search-0007-")
    assert tr.trial_run_name(7) == "trial-0007"


def test_registry_and_modes():
    assert tr.tracker_name({"wandb": "offline"}) == "wandb"
    assert tr.tracker_name({"wandb": "online"}) == "wandb"
    assert tr.tracker_name({"wandb": "disabled"}) == "disabled"
    assert tr.tracker_name(None) == "wandb"               # default: offline
    with pytest.raises(ValueError):
        tr.tracker_name({"wandb": "bogus"})
    assert set(tr.TRACKERS) >= {"wandb", "disabled"}


def test_scrub_secrets():
    params = {"lr": 1e-4, "api_key": SECRET, "hf_token": "x", "tracking": {"api_key": SECRET},
              "nested": {"password": "p", "r": 8}, "note": f"key={SECRET}"}
    assert tr.scrub_secrets(params, (SECRET,)) == {"lr": 1e-4, "nested": {"r": 8}, "note": "<redacted>"}


def test_offline_trial_writes_run_files_and_no_secret(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracking = {"wandb": "offline", "project": "proj", "entity": None, "api_key": SECRET}
    params = {"lora_r": 16, "learning_rate": 2e-4, "target_modules": ["q_proj", "v_proj"], "api_key": SECRET}

    tracker = tr.start_trial(str(run_dir), "my-search", 7, params, tracking)
    assert isinstance(tracker, tr.WandbTracker)
    for metrics in ROUNDS:
        tracker.log_round(metrics)
    tracker.finish({"objective": 0.72}, "COMPLETE")
    tracker.finish({}, "COMPLETE")           # idempotent
    tracker.log_round(ROUNDS[0])             # after finish: ignored

    dirs = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert len(dirs) == 1
    assert dirs[0].endswith(tr.run_id("my-search", 7))
    got = parse_run(run_dir)

    run = got["run"]
    assert run.run_id == tr.run_id("my-search", 7)
    assert run.display_name == "trial-0007"
    assert run.run_group == "my-search"
    assert run.project == "proj"

    assert got["config"]["lora_r"] == 16
    assert got["config"]["learning_rate"] == 2e-4
    assert got["config"]["target_modules"] == ["q_proj", "v_proj"]
    assert got["config"]["trial_number"] == 7
    assert "api_key" not in got["config"]

    rows = [r for r in got["history"] if "eval_loss" in r]
    assert [r["__step"] for r in rows] == [1, 2]
    # the round's example answers (generation-based evaluation) as a table; the file holds its rows
    assert rows[1]["answers"]["_type"] == "table-file"
    (table,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files" / rows[1]["answers"]["path"]))
    assert json.load(open(table))["data"] == [["p", "r", "a"]]
    assert [r["eval_loss"] for r in rows] == [1.5, 0.9]
    assert "energy_j" not in rows[0] and rows[1]["energy_j"] == 512.0

    summary = got["summary"]
    assert summary["state"] == "COMPLETE"
    assert summary["objective"] == 0.72
    assert summary["tokens_per_s"] == 1300.0
    assert summary["peak_mem_mb"] == 2100.0
    assert summary["adapter_mb"] == 1.2
    assert summary["trainable_params"] == 294912

    secret = SECRET.encode()
    for path in all_files(run_dir):
        with open(path, "rb") as fh:
            assert secret not in fh.read(), f"api key leaked into {path}"


def test_resumed_trial_reuses_run_id(tmp_path):
    tracking = {"wandb": "offline"}
    for state in ("FAIL", "PRUNED"):
        tracker = tr.start_trial(str(tmp_path), "s", 3, {"lr": 1}, tracking)
        tracker.log_round({"round": 1, "eval_loss": 2.0})
        tracker.finish({}, state)
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    # same run id both times (a second offline dir within the same second gets a "-1" suffix)
    assert len(runs) == 2 and all(tr.run_id("s", 3) in os.path.basename(r) for r in runs)


def test_disabled_writes_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("wandb.init must not be called when disabled")

    monkeypatch.setattr(wandb, "init", boom)
    tracking = {"wandb": "disabled", "api_key": SECRET}
    tracker = tr.start_trial(str(tmp_path), "s", 1, {"lr": 1}, tracking)
    assert isinstance(tracker, tr.NullTracker)
    tracker.log_round(ROUNDS[0])
    tracker.finish({"x": 1}, "COMPLETE")
    tr.log_tables(str(tmp_path), "s", tracking, {"trials": [{"a": 1}]})
    assert list(tmp_path.iterdir()) == []
    assert "WANDB_API_KEY" not in os.environ


def test_init_failure_degrades_to_noop(tmp_path, monkeypatch, caplog):
    def boom(*a, **k):
        raise wandb.errors.CommError("simulated init timeout")

    monkeypatch.setattr(wandb, "init", boom)
    with caplog.at_level(logging.WARNING, logger="search.run.tracking"):
        tracker = tr.start_trial(str(tmp_path), "s", 1, {"lr": 1}, {"wandb": "offline"})
        tracker.log_round(ROUNDS[0])
        tracker.finish({}, "FAIL")
        tr.log_tables(str(tmp_path), "s", {"wandb": "offline"}, {"trials": [{"a": 1}]})
    assert isinstance(tracker, tr.NullTracker)
    assert "init failed" in caplog.text and "simulated init timeout" in caplog.text


def test_log_failure_degrades_once(caplog):
    class BadRun:
        summary = {}
        finished = 0

        def log(self, *a, **k):
            raise RuntimeError("disk full")

        def finish(self, exit_code=None):
            BadRun.finished += 1

    tracker = tr.WandbTracker(BadRun(), "s trial-0001")
    with caplog.at_level(logging.WARNING, logger="search.run.tracking"):
        for metrics in ROUNDS:
            tracker.log_round(metrics)
        tracker.finish({}, "COMPLETE")
    assert caplog.text.count("disk full") == 1
    assert BadRun.finished == 1


def test_missing_wandb_gives_install_hint(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"peft-search\[wandb\]"):
        tr.start_trial(str(tmp_path), "s", 1, {}, {"wandb": "offline"})


def test_log_tables_summary_run(tmp_path):
    tables = {"trials": [{"trial": 0, "objective": 0.5, "state": "COMPLETE"},
                         {"trial": 1, "objective": None, "state": "FAIL", "extra": float("nan")}]}
    tr.log_tables(str(tmp_path), "my-search", {"wandb": "offline"}, tables)
    got = parse_run(tmp_path)
    assert got["run"].display_name == "summary"
    assert got["run"].run_group == "my-search"
    assert got["run"].run_id == tr.run_id("my-search", "summary")
    logged = [r for r in got["history"] if "trials" in r]
    assert logged and logged[0]["trials"]["_type"] == "table-file"
    assert logged[0]["trials"]["nrows"] == 2
    table_files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "trials_*.table.json"))
    assert table_files
    table = json.load(open(table_files[0]))
    assert table["columns"] == ["trial", "objective", "state", "extra"]
    assert table["data"][1] == [1, None, "FAIL", None]


def test_online_mode_passes_key_via_environment_only(tmp_path, monkeypatch):
    """Online is only used when configured; the key goes to os.environ, never to config (no network: init is faked)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    calls = []

    class FakeRun:
        summary = {}

        def log(self, *a, **k):
            pass

        def finish(self, exit_code=None):
            pass

    def fake_init(**kwargs):
        calls.append(kwargs)
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    tracking = {"wandb": "online", "project": "p", "entity": "team", "api_key": SECRET}
    tracker = tr.start_trial(str(tmp_path), "s", 2, {"lr": 1, "token": SECRET}, tracking)
    tracker.finish({}, "COMPLETE")
    (kw,) = calls
    assert kw["mode"] == "online" and kw["entity"] == "team" and kw["project"] == "p"
    assert kw["id"] == tr.run_id("s", 2) and kw["resume"] == "allow" and kw["group"] == "s"
    assert kw["settings"].init_timeout == tr.INIT_TIMEOUT_S
    assert SECRET not in json.dumps(kw["config"])
    assert os.environ["WANDB_API_KEY"] == SECRET


def test_offline_mode_never_exports_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(wandb, "init", lambda **kw: None)
    tr.start_trial(str(tmp_path), "s", 2, {}, {"wandb": "offline", "api_key": SECRET}).finish({}, "COMPLETE")
    assert "WANDB_API_KEY" not in os.environ


def test_wandb_sync_command_lists_the_searchs_offline_runs(tmp_path):
    import subprocess
    import sys

    tr.log_tables(str(tmp_path), "my-search", {"wandb": "offline"}, {"trials": [{"trial": 0}]})
    tr.start_trial(str(tmp_path), "my-search", 3, {"r": 8}, {"wandb": "offline"}).finish({}, "COMPLETE")
    assert len(tr.offline_runs(str(tmp_path))) == 2
    proc = subprocess.run([sys.executable, "-m", "search", "wandb-sync", str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr
    assert "Would sync 2 run(s)" in said and tr.run_id("my-search", 3) in said


def test_wandb_sync_without_offline_runs_exits_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "search", "wandb-sync", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "holds no W&B offline runs" in proc.stderr


def test_a_searched_setting_that_only_mentions_a_token_reaches_the_config():
    params = {"num_virtual_tokens": 20, "max_tokens": 8, "hf_token": "x", "api-key": "y", "apikey": "z",
              "aws_credentials": "w", "auth": "v"}
    assert tr.scrub_secrets(params) == {"num_virtual_tokens": 20, "max_tokens": 8}
