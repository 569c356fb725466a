"""The probe of trainers/packing/probe.py on a real tiny LLaMA on CPU: it calibrates the cost model from packs of 1
and 2 members, and the model's memory for 3 members is checked against a measured pack of 3.

On CPU the peak is the process' resident memory (~0.5 GiB of Python and libraries, the same in every
measurement); what the pack adds over one member at 16 rows x 128 tokens is ~30 MiB a member here
(activations, logits, adapter states). Seen in two runs: measured increment K=1 -> K=3 62.5 and 65.4 MiB,
predicted 59.9 and 71.0 (-4%, +9%). Resident memory is a noisy reading of it: allocator rounding, heap
fragmentation and the kernel reclaiming file-backed library pages under memory pressure move it by several
MiB, and one CI run (a machine busy with other work) measured 52.4 MiB against 72.9 predicted (+39%). So
the increment is allowed 50%: a model that left out the per-member cost, or counted it twice, still
fails. The absolute peak (within 1% seen) is allowed 10%. Step times
are not asserted (tests never assert on wall-clock time: this machine is shared); the benchmark
benchmarks/packed_throughput.py --cost-model prints them."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from trainers_helpers import lm_settings

from trainers.model import load_base
from trainers.packing.cost_model import CostModel, lora_params
from trainers.packing.probe import base_shape, decide, measure_pack


@pytest.fixture(scope="module")
def probed(tiny_llama, lm_data):
    settings = lm_settings(tiny_llama, lm_data, batch_size=16)
    settings = replace(settings, data=replace(settings.data, max_length=128))
    base = load_base(settings.model)
    return base, settings, decide(base, settings, k_max=8, steps=2)


def test_probe_predicts_the_memory_of_a_larger_pack(probed):
    base, settings, decision = probed
    model = CostModel.from_dict(decision)
    measured_one = next(p for p in decision["probe"] if p["k"] == 1 and p["rows"] == 16)["peak_bytes"]
    three = measure_pack(base, settings, 3, 16, steps=2, warmup=1)
    predicted = model.memory_bytes(three.members)
    assert predicted == pytest.approx(three.peak_bytes, rel=0.1)
    increment = three.peak_bytes - measured_one
    assert increment > 0
    assert predicted - model.memory_bytes(three.members[:1]) == pytest.approx(increment, rel=0.5)


def test_probe_records_its_points_and_chooses_within_budget_and_cap(probed):
    base, settings, decision = probed
    assert [(p["k"], p["rows"]) for p in decision["probe"]] == [(1, 8), (1, 16), (2, 16)]
    assert all(p["peak_bytes"] > 0 and p["step_s"] > 0 for p in decision["probe"])
    assert 1 <= decision["k"] <= 8
    chosen = decision["predicted"][decision["k"] - 1]
    assert chosen["k"] == decision["k"] and chosen["memory_bytes"] <= decision["budget_bytes"]
    targets = [(m.in_features, m.out_features) for name, m in base.model.named_modules()
               if name.endswith(("q_proj", "v_proj"))]
    assert decision["member"]["trainable_params"] == lora_params(4, targets)


def test_base_shape_counts_the_loaded_model(probed):
    base = probed[0]
    shape, config = base_shape(base), base.model.config
    assert shape.params == sum(param.numel() for param in base.model.parameters())   # fp32: stored = logical
    assert shape.matmul_params == sum(m.in_features * m.out_features for m in base.model.modules()
                                      if isinstance(m, torch.nn.Linear))
    assert (shape.hidden, shape.layers, shape.logit_width) == (config.hidden_size, config.num_hidden_layers,
                                                               config.vocab_size)
    assert shape.quantized_params == 0 and shape.weight_bytes() == 4 * shape.params
