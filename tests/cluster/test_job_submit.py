"""`ray job submit --working-dir . -- peft-search run examples/smoke.yaml` against a real Ray cluster started
with `ray start --head` on this machine (docs/cluster.md), with five trials instead of the smoke spec's
two so that `ray job stop` lands in the search's middle: a smoke trial takes ~5 s, `ray job stop` 6 s here, and
once in CI long enough for the second of two trials to end first.

The test starts its own head on free ports with its own token, waits for the job, checks the run directory and
`ray job logs`, and stops only the cluster it started (its process group), never other Ray processes here."""
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import yaml

from cluster.local import free_port

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.dirname(sys.executable)
pytestmark = pytest.mark.slow
TRIALS = 5


def ray_cli(*args, env, timeout=120):
    """The ray CLI; a job submitted before the head's job agent is up is submitted again (Ray answers
    "No available agent to submit job, please try again later" for a while after `ray job list` works)."""
    deadline = time.time() + 120
    while True:
        done = subprocess.run([os.path.join(BIN, "ray"), *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if "No available agent" not in done.stderr + done.stdout or time.time() > deadline:
            return done
        time.sleep(3)


@pytest.fixture(scope="module")
def ray_head():
    """A head node of our own: `ray start --head --block` in its own process group."""
    if shutil.which("ray", path=BIN) is None:
        pytest.skip("the ray CLI is not installed next to this Python")
    # The job's entrypoint (`peft-search`) is looked up on the PATH the head was started with.
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")   # short: Ray's socket paths have a length limit
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    head = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", "--block", "--num-cpus", "8", "--node-ip-address",
         "127.0.0.1", "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir, "--disable-usage-stats",
         *[str(x) for pair in ports.items() for x in pair]],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while ray_cli("job", "list", "--address", address, env=env).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the head's job server did not come up in 180 s"
            time.sleep(2)
        yield address, env
    finally:
        # our head and everything it started, nothing else; killed, not stopped (a graceful stop took 43 s in
        # CI, and the cluster is thrown away anyway)
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        # deleted in the background: it holds the runtime env's copy of the virtualenv (16 s to delete)
        subprocess.Popen(["rm", "-rf", temp_dir], start_new_session=True)


def smoke_spec_with_more_trials(tmp_path) -> str:
    """examples/smoke.yaml with TRIALS trials, written with absolute data paths (it lives outside examples/)."""
    with open(os.path.join(REPO, "examples", "smoke.yaml")) as smoke:
        spec = yaml.safe_load(smoke)
    spec["search"]["trials"] = TRIALS
    for key in ("train", "eval"):
        spec["data"][key] = os.path.join(REPO, "examples", spec["data"][key])
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_ray_job_submit_runs_a_search_that_job_stop_interrupts_and_resume_finishes(ray_head, tmp_path):
    """`ray job submit` of a search, `ray job stop` in its middle, then `peft-search resume` of its run directory,
    which finishes it. The resume runs here, on an embedded Ray: a job of its own takes another 2 minutes of the
    suite (a job's processes start in the runtime env's copy of the virtualenv) and checks no more than the
    submit did."""
    import optuna

    address, env = ray_head
    runs, job_id = tmp_path / "runs", f"peft-search-smoke-{uuid.uuid4().hex[:8]}"
    spec = smoke_spec_with_more_trials(tmp_path)
    submit = ray_cli("job", "submit", "--no-wait", "--address", address, "--submission-id", job_id,
                     "--working-dir", REPO, "--runtime-env", os.path.join(REPO, "cluster", "runtime_env.yaml"),
                     "--", "peft-search", "run", spec, "--runs-dir", str(runs), env=env)
    assert submit.returncode == 0, submit.stderr
    run_dir, storage = runs / "smoke", f"sqlite:///{runs / 'smoke' / 'study.sqlite3'}"

    def trials():
        try:
            return optuna.load_study(study_name="peft-search", storage=storage).get_trials()
        except Exception:   # not there yet
            return []

    deadline = time.time() + 600
    while not any(t.state.is_finished() for t in trials()):   # stop it once trial 0 is done
        assert time.time() < deadline, ray_cli("job", "logs", "--address", address, job_id, env=env).stdout[-3000:]
        time.sleep(1)
    # stopped first, its logs read after: a trial takes seconds, fewer than a loaded machine's `ray job logs`
    stop_started = time.time()
    stop = ray_cli("job", "stop", "--address", address, job_id, env=env, timeout=300)
    stop_took = time.time() - stop_started
    assert stop.returncode == 0, stop.stderr
    logs = ray_cli("job", "logs", "--address", address, job_id, env=env)
    assert logs.returncode == 0, logs.stderr
    kept = {t.number: (t.state, t.value, t.datetime_complete) for t in trials() if t.state.is_finished()}
    assert kept and len(kept) < TRIALS, (kept, f"ray job stop took {stop_took:.1f} s")   # stopped in the middle
    status = ray_cli("job", "status", "--address", address, job_id, env=env)
    assert "stopped" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr

    resume = subprocess.run([sys.executable, "-m", "search", "resume", str(run_dir)], capture_output=True,
                            text=True, timeout=900, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    first_rerun = min(set(range(TRIALS)) - set(kept))
    assert f"[peft-search] trial {first_rerun} complete" in resume.stdout + resume.stderr
    finished = trials()
    assert [t.number for t in finished] == list(range(TRIALS)) and all(t.state.is_finished() for t in finished)
    for number, before in kept.items():   # kept as it was, not rerun
        t = finished[number]
        assert (t.state, t.value, t.datetime_complete) == before

    rows = (run_dir / "trials.csv").read_text().splitlines()
    assert len(rows) == TRIALS + 1 and all(",COMPLETE," in row for row in rows[1:]), rows
    assert (run_dir / "best" / "adapter_model.safetensors").is_file()
    assert "# peft-search report: smoke" in (run_dir / "report.md").read_text()
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run files in the run directory"
    # the progress lines reach `ray job logs`
    assert "[peft-search] trial 0 complete" in logs.stdout + ray_cli("job", "logs", "--address", address, job_id,
                                                                          env=env).stdout
