"""The packed-trials throughput benchmark's CPU path (benchmarks/packed_throughput.py --device cpu --tiny)."""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from benchmarks import packed_throughput  # noqa: E402


def test_cpu_path_times_every_arm_and_writes_the_ratios(tmp_path):
    torch.set_num_threads(1)   # seconds, not a minute, on a busy 2-core runner; the conftest fixture restores it
    out = tmp_path / "packed_throughput_cpu.json"
    packed_throughput.main(["--device", "cpu", "--tiny", "--ks", "3", "--ranks", "4,8", "--seq", "16",
                            "--warmup", "1", "--steps", "1", "--cost-model", "--out", str(out)])
    summary = json.loads(out.read_text())
    assert (summary["device"], summary["shape"], summary["seq"]) == ("cpu", "llama-tiny", 16)
    [row] = summary["rows"]
    assert row["K"] == 3 and row["ranks"] == [4, 8, 4]
    assert set(row["arms"]) == set(packed_throughput.ARMS)
    for figures in row["arms"].values():
        assert "error" not in figures, figures
        assert figures["tokens_per_s"] > 0 and figures["peak_gib"] > 0
    # the same three adapters in every arm (LoRA on q/k/v/o_proj at ranks 4, 8, 4)
    assert len({figures["trainable"] for figures in row["arms"].values()}) == 1
    packed, solo = row["arms"]["packed"], row["arms"]["solo"]
    assert row["ratios"]["packed/solo"]["tokens_per_s"] == round(packed["tokens_per_s"] / solo["tokens_per_s"], 3)
    assert len(solo["per_trial_tokens_per_s"]) == 3
    # --cost-model: probed at the largest rank (packs of 1 and 2 at batch 1), predicted for the 3 mixed ranks
    assert [p["k"] for p in summary["cost_model"]["probe"]] == [1, 2] and 1 <= summary["cost_model"]["k"] <= 3
    figures = row["cost_model"]
    assert figures["measured_tokens_per_s"] == packed["tokens_per_s"] and figures["measured_peak_gib"] > 0
    assert figures["predicted_peak_gib"] > 0 and figures["predicted_tokens_per_s"] > 0
