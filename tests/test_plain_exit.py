"""tests/conftest.py: a crash in the interpreter's teardown no longer decides the test run's exit status."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# what a library's native thread does to an exiting interpreter now and then, here every time
CRASH_AT_TEARDOWN = """
import atexit, os, signal
atexit.register(lambda: os.kill(os.getpid(), signal.SIGSEGV))
"""


def _pytest_in(directory: Path, test_body: str, with_conftest: bool) -> subprocess.CompletedProcess:
    (directory / "test_one.py").write_text(CRASH_AT_TEARDOWN + f"\ndef test_one():\n    {test_body}\n")
    if with_conftest:
        shutil.copy(Path(__file__).with_name("conftest.py"), directory / "conftest.py")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory)],
                          cwd=directory, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("test_body, status, summary", [("assert True", 0, "1 passed"),
                                                         ("assert False", 1, "1 failed")])
def test_the_run_exits_with_pytests_status_and_summary_despite_a_crash_at_teardown(tmp_path, test_body, status,
                                                                                   summary):
    bare = tmp_path / "bare"
    bare.mkdir()
    crashed = _pytest_in(bare, test_body, with_conftest=False)
    assert crashed.returncode == -11, crashed.stdout[-2000:]   # the teardown crash decides, without the conftest
    guarded = tmp_path / "guarded"
    guarded.mkdir()
    result = _pytest_in(guarded, test_body, with_conftest=True)
    assert result.returncode == status, result.stdout[-2000:] + result.stderr[-2000:]
    assert summary in result.stdout
