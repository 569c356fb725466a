"""`peft-search`: validate | run | resume | report | export | wandb-sync (INTERFACE.md).

Exit codes: 0 done; 1 runtime failure; 2 invalid input, nothing launched. Invalid input is
reported one problem per line on stderr, each naming its key path, before Ray starts.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

EXIT_OK, EXIT_RUNTIME, EXIT_INVALID = 0, 1, 2
# A problem line is read in a terminal: a value echoed from a 10 MB line of input is cut in its middle.
MAX_LINE = 1000


def _one_line(message: str) -> str:
    """`message` as one line of at most MAX_LINE characters, its start (the key path) and end kept."""
    line = " ".join(message.splitlines())
    if len(line) <= MAX_LINE:
        return line
    half = MAX_LINE // 2
    return f"{line[:half]} [... {len(line) - 2 * half} characters ...] {line[-half:]}"


def _problems_exit(problems: List[str]) -> int:
    for problem in problems:
        print(_one_line(problem), file=sys.stderr)
    return EXIT_INVALID


def _cluster_address(args) -> Optional[str]:
    """--address, else RAY_ADDRESS: the cluster `run` joins (None: embedded Ray, as cluster.local.connect)."""
    return args.address or os.environ.get("RAY_ADDRESS") or None


def _load(args):
    """(spec, problems) of the spec args.spec names; its warnings (valid, but worth a look) go to stderr."""
    from search.spec.validate import check_file

    spec, problems, warnings = check_file(args.spec, embedded=_cluster_address(args) is None)
    for warning in warnings:
        print(_one_line(warning), file=sys.stderr)
    return spec, problems


def cmd_validate(args) -> int:
    spec, problems = _load(args)
    if problems:
        return _problems_exit(problems)
    print(f"{args.spec}: valid ({spec.peft.method} on {spec.model.name_or_path}, {len(spec.search_space())} "
          f"searched parameters, {spec.search.trials} trials)")
    from search.spec.validate import data_preview

    for line in data_preview(spec):   # prompt-completion / chat rows: one row as trained, the loss's part marked
        print(line)
    return EXIT_OK


def cmd_run(args) -> int:
    spec, problems = _load(args)
    if problems:
        return _problems_exit(problems)
    return _run(spec, args.runs_dir, args.address, resume=args.resume)


def cmd_resume(args) -> int:
    from search.run.resume import load_run_spec

    run_dir = os.path.abspath(args.run_dir)
    spec, problems = load_run_spec(run_dir, embedded=_cluster_address(args) is None)
    if problems:
        return _problems_exit(problems)
    return _run(spec, os.path.dirname(run_dir), args.address, resume=True)


def _run(spec, runs_dir: str, address: Optional[str], resume: bool) -> int:
    from search.run.driver import run_search
    from search.run.resume import ResumeError
    from search.store.remote import RemoteStorageError
    from search.store.rundir import RunDirError
    from search.store.storage import StorageError
    from trainers.records import DataError

    try:
        run_dir = run_search(spec, runs_dir, address=address, resume=resume)
    except RunDirError as exc:
        return _problems_exit([f"--runs-dir: {exc}"])
    except (ResumeError, StorageError, RemoteStorageError) as exc:   # each message names its key (`space:`, `storage:`)
        return _problems_exit([str(exc)])
    except DataError as exc:   # data that only the run reads (an HF dataset id), before anything started
        return _problems_exit([f"data: {exc}"])
    except KeyboardInterrupt:
        print(f"interrupted; finished trials are kept: continue with `peft-search resume "
              f"{os.path.abspath(os.path.join(runs_dir, spec.name))}`", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as exc:
        from search.run.console import failure_log

        log = failure_log(exc)
        if log is None:   # failed before the run's log existed: Python's traceback says it all
            raise
        # the terminal has shown the log's tail, the traceback's end
        print(_one_line(f"the search stopped: {type(exc).__name__}: {exc}; its traceback is in {log}"),
              file=sys.stderr)
        return EXIT_RUNTIME
    return _print_report(run_dir)


def _print_report(run_dir: str) -> int:
    with open(os.path.join(run_dir, "report.md"), encoding="utf-8") as handle:
        print(handle.read())
    print(f"run directory: {run_dir}")
    html = os.path.join(run_dir, "report.html")
    if os.path.isfile(html):  # the same report with plots, one file that opens offline
        print(f"report with plots: {html}")
    from search.run.console import LOG_FILE

    log = os.path.join(run_dir, LOG_FILE)
    if os.path.isfile(log):   # what the libraries and the workers printed (search/run/console.py)
        print(f"library and worker output: {log}")
    return EXIT_OK


def cmd_report(args) -> int:
    from search.report import outputs
    from search.store.rundir import RunDirError

    try:
        outputs.refresh(os.path.abspath(args.run_dir))
    except (RunDirError, FileNotFoundError) as exc:
        return _problems_exit([f"RUN_DIR: {exc}"])
    return _print_report(os.path.abspath(args.run_dir))


def cmd_export(args) -> int:
    from search.report.export import ExportError, export_adapter

    try:
        path = export_adapter(os.path.abspath(args.run_dir), args.out, trial=args.trial, merge=args.merge)
    except ExportError as exc:
        return _problems_exit([str(exc)])
    print(f"wrote {path}")
    return EXIT_OK


def cmd_wandb_sync(args) -> int:
    import subprocess

    from search.run.tracking import sync_command

    try:
        command = sync_command(os.path.abspath(args.run_dir), dry_run=args.dry_run, project=args.project,
                               entity=args.entity)
    except (FileNotFoundError, ImportError) as exc:
        return _problems_exit([f"RUN_DIR: {exc}"])
    # the key comes from WANDB_API_KEY or `wandb login`, never from the command line
    return EXIT_OK if subprocess.run(command).returncode == 0 else EXIT_RUNTIME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-search", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a spec, its model and data; launches nothing")
    p.add_argument("spec")
    p.add_argument("--address", default=None, help="check for a run on this Ray cluster (default: RAY_ADDRESS, "
                   "or embedded: the GPUs asked for must then be on this machine)")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("run", help="run the search (embedded local Ray unless --address / RAY_ADDRESS)")
    p.add_argument("spec")
    p.add_argument("--runs-dir", default="runs", help="parent of the run directory (default: ./runs)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded)")
    p.add_argument("--resume", action="store_true",
                   help="continue the search if the run directory holds one (same space and objective)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("resume", help="continue an interrupted search: finished trials kept, interrupted ones "
                                      "from their last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded)")
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("report", help="(re)build trials.csv, best/, report.md and report.html from stored results")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("export", help="write the best (or trial N's) adapter, or a merged model")
    p.add_argument("run_dir")
    p.add_argument("--trial", type=int, default=None)
    p.add_argument("--merge", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("wandb-sync", help="upload a search's W&B offline runs (wandb sync), e.g. after it ran offline")
    p.add_argument("run_dir")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    p.add_argument("--project", default=None, help="W&B project (default: the one the runs were made with)")
    p.add_argument("--entity", default=None)
    p.set_defaults(func=cmd_wandb_sync)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
