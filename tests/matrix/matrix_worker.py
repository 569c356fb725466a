"""One rank of the combination matrix's worker group, started by test_combinations.py (torchrun-style env).

Usage: python matrix_worker.py JOBS.json OUT_DIR
JOBS.json is a list of {"index": I, "settings": {...}, "pack": K}; each job trains in turn in this one
process group, as a Ray Train worker group runs trial after trial: K = 1 through trainers.recipe.run_trial,
K > 1 as a pack of K members (trainers.packing.pack.Pack, as search/pool.serve_packed runs it). After each job,
OUT_DIR/result-<rank>-<I>.json holds its last metrics, or the reason it failed; a failed job ends the
process (the other ranks may be stuck in a collective, and the group's timeout ends them).
"""
import datetime
import gc
import json
import os
import sys
import traceback
from dataclasses import replace

import torch
import torch.distributed as dist

from trainers.recipe import run_trial
from trainers.settings_io import settings_from_dict


def run_solo(settings, out_dir):
    reports = []
    run_trial(settings, reports.append, out_dir)
    return reports[-1]


def run_pack(settings, size, out_dir):
    """`size` members, the same settings but each its own seed, stepped until all finish."""
    from trainers.model import load_lent_base
    from trainers.packing.pack import Pack

    pack = Pack(load_lent_base(settings))
    for member in range(size):
        pack.add(member, replace(settings, training=replace(settings.training, seed=member)))
    last = {}
    while any(member.trains for member in pack.members.values()):
        result = pack.step()
        if result.failed:
            raise RuntimeError(f"pack member failed: {result.failed}")
        for key in result.round_ends:
            last[key] = pack.evaluate(key)
            if pack.members[key].finished:
                pack.save(key, os.path.join(out_dir, str(key)), last[key])
    pack.close()
    return last[0]


def main() -> None:
    jobs_path, out_dir = sys.argv[1:]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    with open(jobs_path) as handle:
        jobs = json.load(handle)
    try:
        for job in jobs:
            result_path = os.path.join(out_dir, f"result-{rank}-{job['index']}.json")
            trial_dir = os.path.join(out_dir, f"trial{job['index']}")
            try:
                settings = settings_from_dict(job["settings"])
                metrics = run_pack(settings, job["pack"], trial_dir) if job["pack"] > 1 \
                    else run_solo(settings, trial_dir)
                result = {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
            except Exception as exc:   # recorded with its reason; the group cannot go on after a failure
                result = {"error": f"{type(exc).__name__}: {exc}"[:2000], "trace": traceback.format_exc()[-4000:]}
            with open(result_path, "w") as handle:
                json.dump(result, handle)
            if "error" in result:
                sys.exit(1)
            torch.set_num_threads(1)
            # as the search's worker groups do (search/run/pool.py): what the libraries made stays out of each
            # trial's gc.collect(), which otherwise walks all of it and is most of a tiny trial's time
            gc.collect()
            gc.freeze()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
