"""One rank of a DeepSpeed trial, started by test_deepspeed.py in a fresh process (torchrun-style env).

Usage: python deepspeed_worker.py JOB.json [JOB.json ...] OUT_DIR
Each job is {"settings": {...}, "stop_after_round": N or null, "resume": K or null}, run as trial <index>
inside one process group: `stop_after_round` raises from `report` at that round (as ASHA stopping the trial
would), `resume` continues trial K in its own directory. Writes this rank's reports to
OUT_DIR/reports-<rank>.json (a list per job). NCCL where there is a GPU, else gloo.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from trainers.recipe import run_trial
from trainers.settings_io import settings_from_dict


class Stopped(Exception):
    pass


def run_job(job, index, out_dir):
    reports = []

    def report(metrics):
        reports.append(metrics)
        if metrics["round"] == job.get("stop_after_round"):
            raise Stopped

    resume = job.get("resume")
    output_dir = os.path.join(out_dir, f"trial{index if resume is None else resume}")
    try:
        run_trial(settings_from_dict(job["settings"]), report, output_dir,
                  resume_from=None if resume is None else output_dir)
    except Stopped:
        pass
    return reports


def main() -> None:
    *job_paths, out_dir = sys.argv[1:]
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    all_reports = []
    try:
        for index, path in enumerate(job_paths):
            with open(path) as handle:
                all_reports.append(run_job(json.load(handle), index, out_dir))
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"reports-{rank}.json"), "w") as handle:
        json.dump({"reports": all_reports, "threads": torch.get_num_threads()}, handle)


if __name__ == "__main__":
    main()
