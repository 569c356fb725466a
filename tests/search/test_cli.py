"""The CLI's exit codes and messages (INTERFACE.md): invalid input exits 2 before anything starts.

`run_cli` runs the real `python -m search` process; `cli` calls its main() here (no interpreter start and
no imports: a process took 8-12 s of the suite per call)."""
import subprocess
import sys

import yaml

from search.cli import main as cli_main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "search", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def cli(capsys, *args):
    """(exit code, stdout, stderr) of the CLI's main() on `args`."""
    capsys.readouterr()
    code = cli_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_validate_accepts_the_quickstart(capsys):
    code, out, err = cli(capsys, "validate", "examples/quickstart.yaml")
    assert code == 0, err
    assert "valid" in out


def test_invalid_spec_exits_2_with_one_line_per_problem_and_writes_nothing(tmp_path):
    spec = yaml.safe_load(open("examples/quickstart.yaml"))
    spec["data"]["train"] = "/nonexistent/train.jsonl"
    spec["space"]["r"] = [0, 4]
    spec["search"]["trials"] = 0
    spec["bogus"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "runs"
    proc = run_cli("run", str(path), "--runs-dir", str(runs))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    for key in ("data.train", "space.r", "search.trials", "bogus"):
        assert any(line.startswith(key) for line in lines), (key, lines)
    assert not runs.exists(), "nothing may be written for an invalid spec"


def test_report_on_a_directory_without_a_search_exits_2(tmp_path):
    proc = run_cli("report", str(tmp_path))
    assert proc.returncode == 2 and "holds no search" in proc.stderr


def test_export_without_a_search_exits_2(tmp_path):
    proc = run_cli("export", str(tmp_path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "RUN_DIR" in proc.stderr


def test_resume_without_a_search_exits_2(tmp_path):
    proc = run_cli("resume", str(tmp_path))
    assert proc.returncode == 2 and "RUN_DIR" in proc.stderr and "holds no search" in proc.stderr


def test_run_on_a_directory_holding_a_search_is_refused_with_the_resume_command(tmp_path, capsys):
    run_dir = tmp_path / "runs" / yaml.safe_load(open("examples/quickstart.yaml"))["name"]
    run_dir.mkdir(parents=True)
    (run_dir / "search.json").write_text("{}")   # what a started search leaves
    code, _, err = cli(capsys, "run", "examples/quickstart.yaml", "--runs-dir", str(tmp_path / "runs"))
    assert code == 2 and f"peft-search resume {run_dir}" in err, err
    assert sorted(p.name for p in run_dir.iterdir()) == ["search.json"]   # nothing written, nothing started
