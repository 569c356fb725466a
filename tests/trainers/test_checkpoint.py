"""Per-round checkpoints: a trial interrupted in a report resumes and ends as an unbroken run would."""
import json

import pytest
import torch
from safetensors.torch import load_file
from trainers_helpers import cls_settings

from trainers.checkpoint import CHECKPOINT_SUBDIR
from trainers.recipe import run_trial

EVAL_KEYS = ("eval_loss", "eval_accuracy", "eval_f1", "train_loss", "step", "epoch")


class Stopped(Exception):
    """Stands for ASHA stopping a trial, or its worker dying, while it reports."""


def _stop_after(round_number, reports):
    def report(metrics):
        reports.append(metrics)
        if metrics["round"] == round_number:
            raise Stopped
    return report


def test_resumed_trial_ends_as_the_unbroken_one(tmp_path, tiny_bert, cls_data):
    # LoRA dropout (0.05) and accumulation: the RNG and the optimizer state must both come back
    settings = cls_settings(tiny_bert, cls_data, "lora", epochs=3, gradient_accumulation_steps=2)
    straight = []
    final = run_trial(settings, straight.append, str(tmp_path / "straight"))

    broken_dir = tmp_path / "broken"
    first = []
    with pytest.raises(Stopped):
        run_trial(settings, _stop_after(1, first), str(broken_dir))
    root = broken_dir / CHECKPOINT_SUBDIR
    assert (root / "latest").read_text() == "round-0001" and not (broken_dir / "metrics.json").exists()
    saved = load_file(str(root / "round-0001" / "adapter.safetensors"))
    assert saved and all("lora_" in name or "classifier" in name for name in saved)
    state = torch.load(root / "round-0001" / "optimizer.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == first[0]["step"] and state["optimizer"]["state"]

    resumed = []
    again = run_trial(settings, resumed.append, str(broken_dir), resume_from=str(broken_dir))
    assert [r["round"] for r in resumed] == [2, 3]
    # a tolerance for float summation order; on one CPU process the two runs agree to the last bit
    for key in EVAL_KEYS:
        assert again[key] == pytest.approx(final[key], abs=1e-6), key
    assert resumed[0]["train_loss"] == pytest.approx(straight[1]["train_loss"], abs=1e-6)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "round-0003"]   # older rounds removed
    assert json.loads((root / "round-0003" / "state.json").read_text())["finished"] is True

    # resuming a finished trial trains no more: it reports its final metrics once (whoever ran it may have
    # died before hearing them) and returns them
    after = []
    assert run_trial(settings, after.append, str(broken_dir), resume_from=str(broken_dir)) == again
    assert after == [again]


def test_resume_without_a_checkpoint_says_where_it_looked(tmp_path, tiny_bert, cls_data):
    with pytest.raises(FileNotFoundError, match=f"resume_from: {tmp_path} holds no complete checkpoint"):
        run_trial(cls_settings(tiny_bert, cls_data, "lora", epochs=1), lambda m: None, str(tmp_path / "out"),
                  resume_from=str(tmp_path))
