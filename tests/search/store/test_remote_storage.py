"""`resources.storage_path: s3://...` against a real S3 protocol server on 127.0.0.1 (moto's, in a thread).

One small real search writes its results to the bucket through Ray's storage_path and the trials' own uploads;
the tests read the bucket back with boto3. Credentials come from the environment, as in production, and must
appear in no file of the run directory nor in any object of the bucket.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys

import pytest
import yaml

from trainers.tiny_models import build_tiny_classifier, make_learnable_classification_data

moto_server = pytest.importorskip("moto.server", reason="pip install 'peft-search[test]' (moto[server])")

BUCKET, PREFIX, NAME = "peft-results", "searches", "s3run"
SECRET = "s3-secret-Zq81bX0pLm"   # distinctive, so that a copy anywhere is found
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAPEFTSEARCHTEST", "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}   # no wait on a metadata server that is not there


@pytest.fixture(scope="module")
def s3():
    """(endpoint, boto3 client) of a fresh S3 server holding an empty BUCKET; the credentials in os.environ."""
    import boto3

    saved = {key: os.environ.get(key) for key in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def keys(client, prefix: str = "") -> list:
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        found += [item["Key"] for item in page.get("Contents", [])]
    return found


def bucket_url(endpoint: str) -> str:
    return f"s3://{BUCKET}/{PREFIX}?endpoint_override={endpoint}"


def spec_file(root, storage_path: str) -> str:
    model = build_tiny_classifier(str(root / "tiny-bert"), num_labels=2)
    train = make_learnable_classification_data(str(root / "train.jsonl"), 96, seed=1)
    spec = {
        "name": NAME,
        "model": {"name_or_path": model, "task": "sequence-classification"},
        "data": {"train": train, "text_field": "text", "label_field": "label", "max_length": 32},
        "peft": {"method": "lora", "target_modules": ["query", "value"]},
        "space": {"r": [2, 4], "learning_rate": [5e-3, 1e-2]},
        # two rounds a trial, so that a round checkpoint is replaced in the store by the next one
        "training": {"epochs": 2, "batch_size": 16},
        "search": {"algorithm": "random", "trials": 2, "concurrency": 1, "scheduler": "none", "seed": 3},
        "resources": {"deepspeed": {"enabled": False}, "storage_path": storage_path},
        "tracking": {"wandb": "disabled"},
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture(scope="module")
def finished_run(s3, tmp_path_factory):
    endpoint, client = s3
    root = tmp_path_factory.mktemp("s3")
    proc = subprocess.run([sys.executable, "-m", "search", "run", spec_file(root, bucket_url(endpoint)),
                           "--runs-dir", str(root / "runs")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **CREDENTIALS})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "runs" / NAME, client, proc


@pytest.mark.slow
def test_trials_outputs_and_ray_state_are_in_the_bucket(finished_run):
    run_dir, client, _ = finished_run
    base = f"{PREFIX}/{NAME}/"
    stored = set(keys(client, base))
    with open(run_dir / "trials.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["state"] for row in rows] == ["COMPLETE"] * 2
    for row in rows:
        trial = f"{base}trials/{int(row['number']):04d}/"
        for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.json",
                     "settings.json", "checkpoint/latest", "checkpoint/round-0002/state.json"):
            assert trial + name in stored, (trial + name, sorted(stored))
        # only the newest round is kept, in the store as on disk
        assert not any(key.startswith(trial + "checkpoint/round-0001/") for key in stored)
        metrics = json.loads(client.get_object(Bucket=BUCKET, Key=trial + "metrics.json")["Body"].read())
        assert metrics["eval_accuracy"] == pytest.approx(float(row["eval_accuracy"]), abs=1e-6)
    for name in ("trials.csv", "report.md", "report.html", "spec.yaml", "search.json",
                 "best/adapter_model.safetensors", "best/adapter_config.json", "best/metrics.json"):
        assert base + name in stored, name
    uploaded = client.get_object(Bucket=BUCKET, Key=base + "trials.csv")["Body"].read()
    assert uploaded == (run_dir / "trials.csv").read_bytes()
    # Ray Tune's experiment state and the worker group's Ray Train run went to <storage_path>/<name>/ray
    assert any(key.startswith(base + "ray/tune/experiment_state") for key in stored), sorted(stored)
    assert base + "ray/tune/tuner.pkl" in stored
    assert any(key.startswith(base + "ray/tune-group0/") for key in stored)
    assert not (run_dir / "ray").exists()


@pytest.mark.slow
def test_no_credential_is_written_anywhere(finished_run):
    run_dir, client, proc = finished_run
    assert SECRET not in proc.stdout + proc.stderr
    for directory, _subdirs, files in os.walk(run_dir):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                assert SECRET.encode() not in handle.read(), os.path.join(directory, name)
    for key in keys(client, f"{PREFIX}/{NAME}/"):
        assert SECRET.encode() not in client.get_object(Bucket=BUCKET, Key=key)["Body"].read(), key
    saved = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert saved["resources"]["storage_path"].startswith(f"s3://{BUCKET}/{PREFIX}?endpoint_override=")


@pytest.mark.slow
def test_a_trial_missing_locally_is_restored_from_the_store_and_resumes(finished_run, tmp_path):
    """What a retry on another node does: the checkpoint comes from the bucket, and the recipe goes on from it
    (here after its last round, so it reports that round's metrics again)."""
    from search.run.pool import restore_from_store
    from search.store.remote import RemoteRun
    from trainers.checkpoint import has_checkpoint
    from trainers.recipe import run_trial
    from trainers.settings_io import settings_from_dict

    run_dir, _, _ = finished_run
    remote = RemoteRun(yaml.safe_load((run_dir / "spec.yaml").read_text())["resources"]["storage_path"], NAME)
    elsewhere = str(tmp_path / "0001")
    restore_from_store(remote, elsewhere, 1)
    assert has_checkpoint(elsewhere)
    settings = settings_from_dict(json.loads((tmp_path / "0001" / "settings.json").read_text()))
    reports = []
    run_trial(settings, reports.append, elsewhere, resume_from=elsewhere)
    stored = json.loads((run_dir / "trials" / "0001" / "metrics.json").read_text())
    assert len(reports) == 1 and reports[0]["resumed_after_round"] == 2
    assert reports[0]["eval_accuracy"] == pytest.approx(stored["eval_accuracy"])
    nothing = str(tmp_path / "0099")
    restore_from_store(remote, nothing, 99)   # never ran: nothing to restore, the trial starts afresh
    assert not has_checkpoint(nothing)


@pytest.fixture
def no_ray(monkeypatch):
    """A refused spec never gets to Ray: starting it fails the test instead of starting a search."""
    import cluster.local

    monkeypatch.setattr(cluster.local, "connect", lambda *_args: pytest.fail("the search went on to start Ray"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.slow
def test_a_second_search_of_the_same_name_is_refused(finished_run, s3, tmp_path, no_ray, capsys):
    from search.cli import main

    endpoint, _ = s3
    spec = spec_file(tmp_path, bucket_url(endpoint))
    capsys.readouterr()
    assert main(["run", spec, "--runs-dir", str(tmp_path / "runs")]) == 2
    assert f"resources.storage_path: s3://{BUCKET}/{PREFIX}/{NAME} already holds a search" in capsys.readouterr().err
    assert not (tmp_path / "runs" / NAME).exists()


def test_a_missing_bucket_or_credentials_in_the_url_are_refused_before_anything_starts(s3, tmp_path, no_ray, capsys):
    from search.cli import main

    endpoint, _ = s3
    for storage_path, expected in [
            (f"s3://no-such-bucket/x?endpoint_override={endpoint}", "bucket 'no-such-bucket' does not exist"),
            (f"s3://AKIAPEFTSEARCHTEST:{SECRET}@{BUCKET}/x", "credentials come from the environment"),
            (f"s3://{BUCKET}/x?secret_key={SECRET}", "credentials come from the environment")]:
        spec = spec_file(tmp_path, storage_path)
        capsys.readouterr()
        for command in (["validate", spec], ["run", spec, "--runs-dir", str(tmp_path / "runs")]):
            assert main(command) == 2
            stderr = capsys.readouterr().err
            assert "resources.storage_path: " in stderr and expected in stderr and SECRET not in stderr, stderr
    assert not (tmp_path / "runs").exists()
