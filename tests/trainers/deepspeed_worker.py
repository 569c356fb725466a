"""One rank of a DeepSpeed trial, started by test_deepspeed.py in a fresh process (torchrun-style env).

Usage: python deepspeed_worker.py SETTINGS.json [SETTINGS.json ...] OUT_DIR
Runs each settings file as a trial inside one gloo process group and writes this rank's reports
to OUT_DIR/reports-<rank>.json (a list per trial). NCCL where there is a GPU, else gloo.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from trainers.recipe import run_trial
from trainers.settings_io import settings_from_dict


def main() -> None:
    *settings_paths, out_dir = sys.argv[1:]
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    all_reports = []
    try:
        for index, path in enumerate(settings_paths):
            with open(path) as handle:
                settings = settings_from_dict(json.load(handle))
            reports = []
            run_trial(settings, reports.append, os.path.join(out_dir, f"trial{index}"))
            all_reports.append(reports)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"reports-{rank}.json"), "w") as handle:
        json.dump({"reports": all_reports, "threads": torch.get_num_threads()}, handle)


if __name__ == "__main__":
    main()
