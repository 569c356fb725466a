"""`peft-search run` as a user runs it (`python -m search run SPEC --runs-dir DIR`), on a spec written for a test,
and the trials.csv it leaves: for the tests of whole searches."""
import csv
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import yaml


def run_spec(spec: dict, tmp_path: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Write `spec` to tmp_path/spec.yaml and run it with its run directory under tmp_path/runs."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return subprocess.run([sys.executable, "-m", "search", "run", str(path), "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=timeout)


def finished_run(spec: dict, tmp_path: Path, timeout: float = 900) -> Path:
    """`run_spec` that must exit 0; the run directory."""
    proc = run_spec(spec, tmp_path, timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / "runs" / spec["name"]


def trial_rows(run_dir: Path) -> List[Dict[str, str]]:
    with open(run_dir / "trials.csv", newline="") as handle:
        return list(csv.DictReader(handle))
