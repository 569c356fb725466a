"""`peft-search export`: the best (or trial N's) adapter as a standard PEFT directory, or merged."""
from __future__ import annotations

import os
import shutil
from typing import Optional

from search.store.rundir import RunDirError, read_summary, trial_dir


class ExportError(ValueError):
    """What to export does not exist or cannot be exported; the message says which."""


def export_adapter(run_dir: str, out: str, trial: Optional[int] = None, merge: bool = False) -> str:
    try:
        summary = read_summary(run_dir)
    except RunDirError as exc:
        raise ExportError(f"RUN_DIR: {exc}") from exc
    if trial is None:
        source = os.path.join(run_dir, "best")
        if not os.path.isdir(source):
            raise ExportError(f"RUN_DIR: {run_dir} has no best/ adapter yet (no trial completed)")
    else:
        source = os.path.join(trial_dir(run_dir, trial), "adapter")
        if not os.path.isdir(source):
            raise ExportError(f"--trial: trial {trial} has no saved adapter (it was pruned, failed or never ran)")
    if os.path.exists(out) and os.listdir(out):
        raise ExportError(f"--out: {out} exists and is not empty")
    if not merge:
        shutil.copytree(source, out, dirs_exist_ok=True)
        return out
    return _merge(summary, source, out)


def _merge(summary: dict, adapter_dir: str, out: str) -> str:
    from peft import PeftModel

    from trainers.model import load_base_for_adapter

    base = load_base_for_adapter(summary["model"], summary["task"], adapter_dir)
    if base.model_quantized:
        raise ExportError("--merge: a quantized (nf4/int8) base cannot be merged exactly; export the adapter instead")
    merged = PeftModel.from_pretrained(base.model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    base.tokenizer.save_pretrained(out)
    return out
