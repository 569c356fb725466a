"""Packed trials (trainers/packing/pack.py): each member of a pack trains as its solo run_trial does.

Tolerances: on this CPU (fp32, one thread) packed and solo runs have agreed bit for bit: observed max
difference 0.0 in every eval_loss, train_loss and trained weight, for classification and causal LM, with
members padded to a wider batch. The tests still allow 1e-5 relative / 1e-6 absolute: the extra padding
columns and the larger concatenated batch may pick other kernel blockings (and so other float summation
orders) on other CPUs or BLAS builds; a real mistake (a wrong row, scaling, seed or schedule) moves the
loss in the 2nd-3rd digit after a few steps.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from trainers_helpers import BERT_PARAMS, LLAMA_PARAMS, cls_settings, lm_settings

from trainers import recipe
from trainers.data import build_data, read_trial_rows
from trainers.distributed import current_context
from trainers.metrics import EvalCounts
from trainers.model import load_base
from trainers.packing.pack import LoraPiece, Pack, PackedHead, PackedLinear, can_pack, why_not_packable
from trainers.settings import PeftSettings

REL, ABS = 1e-5, 1e-6
EVAL_KEYS = ("round", "rounds_total", "step", "epoch", "train_loss", "eval_loss", "eval_accuracy", "eval_f1",
             "trainable_params")


def _lora(settings, r, alpha, dropout=0.0, **params):
    return replace(settings, peft=replace(settings.peft, params={**settings.peft.params, "r": r, "lora_alpha": alpha,
                                                                 "lora_dropout": dropout, **params}))


def _cls_members(model, data):
    """Three trials that differ in everything a member owns: rank, alpha (rsLoRA too), learning rate, batch
    size, seed, gradient accumulation; 2 rounds of at most 10 steps, so their rounds end at different steps."""
    base = dict(epochs=1, evals_per_epoch=2, max_steps=10)
    return {
        "a": _lora(cls_settings(model, data, learning_rate=3e-2, batch_size=8, seed=1, **base), 4, 8),
        "b": _lora(cls_settings(model, data, learning_rate=1e-2, batch_size=12, seed=2, **base), 2, 16,
                   use_rslora=True),
        "c": _lora(cls_settings(model, data, learning_rate=5e-2, batch_size=16, seed=3,
                                gradient_accumulation_steps=2, **base), 8, 8),
        # added later in test_members_leave_and_join_without_disturbing_the_others
        "d": _lora(cls_settings(model, data, learning_rate=2e-2, batch_size=10, seed=4, **base), 6, 12,
                   target_modules=["query", "key", "value"]),
    }


@pytest.fixture(scope="module")
def cls_members(tiny_bert, cls_data):
    return _cls_members(tiny_bert, cls_data)


@pytest.fixture(scope="module")
def solo_runs(cls_members, tmp_path_factory):
    """Each member's solo run_trial: its reports and its output directory (adapter/)."""
    runs = {}
    threads = torch.get_num_threads()
    for key, settings in cls_members.items():
        out = tmp_path_factory.mktemp(f"solo_{key}")
        reports = []
        recipe.run_trial(settings, reports.append, str(out))
        runs[key] = (reports, out)
    torch.set_num_threads(threads)
    return runs


def _run(pack, reports, saved_to=None, until=None):
    """Step the pack, evaluating each member at its round ends (and saving it when it finishes) as a
    scheduler would, until no member trains or `until(key, metrics)` says stop (after that report)."""
    while any(member.trains for member in pack.members.values()):
        result = pack.step()
        assert not result.failed, result.failed
        for key in result.round_ends:
            metrics = pack.evaluate(key)
            reports.setdefault(key, []).append(metrics)
            if pack.members[key].finished and saved_to is not None:
                pack.save(key, str(saved_to / key), metrics)
            if until is not None and until(key, metrics):
                return


def _assert_same_reports(packed, solo):
    assert len(packed) == len(solo)
    for mine, theirs in zip(packed, solo):
        for key in EVAL_KEYS:
            assert mine[key] == pytest.approx(theirs[key], rel=REL, abs=ABS), (key, mine, theirs)


def _assert_same_adapter(packed_dir, solo_dir, rtol=REL, atol=ABS):
    mine, theirs = load_file(str(packed_dir / "adapter_model.safetensors")), load_file(
        str(solo_dir / "adapter_model.safetensors"))
    assert set(mine) == set(theirs)
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=rtol, atol=atol)
    assert json.loads((packed_dir / "adapter_config.json").read_text()) == json.loads(
        (solo_dir / "adapter_config.json").read_text())


def test_three_packed_classifiers_match_their_solo_runs(tmp_path, tiny_bert, cls_members, solo_runs):
    torch.set_num_threads(1)   # as the solo runs (engine.num_threads); the conftest fixture restores it
    base = load_base(cls_members["a"].model, num_labels=2)
    pack = Pack(base)
    for key in "abc":
        pack.add(key, cls_members[key])
    # one forward over the three members' micro-batches, 8 + 12 + 16 rows
    assert pack.step().round_ends == []
    assert [(stop - start) for _, start, stop in pack.routing.spans] == [8, 12, 16]
    reports = {}
    _run(pack, reports, saved_to=tmp_path)
    for key in "abc":
        solo_reports, solo_dir = solo_runs[key]
        _assert_same_reports(reports[key], solo_reports)
        _assert_same_adapter(tmp_path / key / "adapter", solo_dir / "adapter")
        saved = json.loads((tmp_path / key / "metrics.json").read_text())
        assert saved["diag_effective_rank"] == pytest.approx(solo_reports[-1]["diag_effective_rank"], rel=1e-4)
        assert saved["eval_loss"] == reports[key][-1]["eval_loss"]
    pack.close()

    # The saved adapter is a standard PEFT adapter: loaded on the bare base, it scores what the pack reported.
    settings = cls_members["a"]
    reloaded = PeftModel.from_pretrained(base.model, str(tmp_path / "a" / "adapter")).eval()
    rows = read_trial_rows(settings.data, settings.model.task)
    counts = EvalCounts(settings.model.task, 2)
    with torch.no_grad():
        for batch in build_data(rows, settings.data, base.tokenizer, settings.model.task, 8, 0, current_context()).eval:
            counts.add(reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
    assert counts.metrics()["eval_loss"] == pytest.approx(reports["a"][-1]["eval_loss"], rel=REL, abs=ABS)


def test_members_leave_and_join_without_disturbing_the_others(tiny_bert, cls_data, cls_members, solo_runs):
    """b is stopped after its first round (as ASHA would), d takes the free place and a diverging trial
    fails alone; a and d train exactly as they do solo."""
    torch.set_num_threads(1)
    base = load_base(cls_members["a"].model, num_labels=2)
    before = {name: param.detach().clone() for name, param in base.model.named_parameters()}
    types = [(name, type(module)) for name, module in base.model.named_modules()]
    pack = Pack(base)
    pack.add("a", cls_members["a"])
    pack.add("b", cls_members["b"])
    # the exploding trial of test_recipe: a finite loss far beyond 100x the first one at step 2
    pack.add("bad", cls_settings(tiny_bert, cls_data, learning_rate=1e9, warmup_ratio=0.0, seed=5))
    reports, failed = {}, {}
    while "b" in pack.members:
        result = pack.step()
        for key, reason in result.failed.items():
            failed[key] = reason
            pack.remove(key)
        for key in result.round_ends:
            reports.setdefault(key, []).append(pack.evaluate(key))
            if key == "b":
                pack.remove("b")
                pack.add("d", cls_members["d"])
    assert list(failed) == ["bad"] and failed["bad"].startswith("diverged at step 2 (loss=")   # as solo
    assert len(reports["b"]) == 1
    _run(pack, reports)
    pack.close()

    _assert_same_reports(reports["b"], solo_runs["b"][0][:1])
    _assert_same_reports(reports["a"], solo_runs["a"][0])
    _assert_same_reports(reports["d"], solo_runs["d"][0])

    # The base as it was lent: its own modules, bit-identical weights, frozen, nothing of PEFT's or ours left.
    assert [(name, type(module)) for name, module in base.model.named_modules()] == types
    after = dict(base.model.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert not any(param.requires_grad for param in base.model.parameters())
    assert not any(isinstance(module, (PackedLinear, PackedHead, LoraPiece)) for module in base.model.modules())
    assert not any(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                   for module in base.model.modules())
    assert not hasattr(base.model, "peft_config")
    assert not pack.members and not pack._packed


def _solo_then_packed(members, tmp_path):
    """Each member's reports trained alone (recipe.run_trial), then all of them in one pack on a fresh base;
    adapters land in tmp_path/solo_<key> and tmp_path/packed/<key>."""
    solo = {}
    for key, settings in members.items():
        solo[key] = []
        recipe.run_trial(settings, solo[key].append, str(tmp_path / f"solo_{key}"))
    torch.set_num_threads(1)
    with Pack(load_base(next(iter(members.values())).model)) as pack:
        for key, settings in members.items():
            pack.add(key, settings)
        reports = {}
        _run(pack, reports, saved_to=tmp_path / "packed")
    return solo, reports


def test_packed_causal_lm_members_match_their_solo_runs(tmp_path, tiny_llama, lm_data):
    members = {
        "a": _lora(lm_settings(tiny_llama, lm_data, batch_size=8, seed=1, epochs=1, evals_per_epoch=2, max_steps=6),
                   4, 8),
        "b": _lora(lm_settings(tiny_llama, lm_data, learning_rate=1e-2, batch_size=12, seed=2, epochs=1,
                               max_steps=4, evals_per_epoch=2), 2, 4, target_modules=["q_proj", "k_proj", "v_proj"]),
    }
    solo, reports = _solo_then_packed(members, tmp_path)
    for key in members:
        for mine, theirs in zip(reports[key], solo[key]):
            for name in ("step", "train_loss", "eval_loss", "eval_accuracy", "eval_perplexity"):
                assert mine[name] == pytest.approx(theirs[name], rel=REL, abs=ABS), (name, mine, theirs)
        assert len(reports[key]) == len(solo[key])
        _assert_same_adapter(tmp_path / "packed" / key / "adapter", tmp_path / f"solo_{key}" / "adapter")


def test_only_lora_can_be_packed(tiny_bert, cls_data):
    lora = cls_settings(tiny_bert, cls_data, "lora")
    assert can_pack(lora) and why_not_packable(lora) is None
    prompt = cls_settings(tiny_bert, cls_data, "prompt-tuning")
    assert not can_pack(prompt)
    assert why_not_packable(prompt).startswith("peft.method=prompt-tuning: its virtual tokens lengthen the sequence")
    assert "virtual tokens" in why_not_packable(cls_settings(tiny_bert, cls_data, "prefix-tuning"))
    assert "only LoRA" in why_not_packable(cls_settings(tiny_bert, cls_data, "ia3"))
    dora = replace(lora, peft=PeftSettings("lora", {**BERT_PARAMS["lora"], "use_dora": True}))
    assert why_not_packable(dora).startswith("peft.use_dora")
    compiled = replace(lora, model=replace(lora.model, compile=True))
    assert why_not_packable(compiled).startswith("model.compile")

    pack = Pack(load_base(lora.model, num_labels=2))
    with pytest.raises(ValueError, match=r"trial 'p' cannot be packed: peft.method=prompt-tuning"):
        pack.add("p", prompt)
    with pytest.raises(ValueError, match=r"the pack's base is a sequence-classification model"):
        pack.add("lm", replace(lora, model=replace(lora.model, task="causal-lm"), peft=PeftSettings(
            "lora", LLAMA_PARAMS["lora"])))
    pack.close()


def test_members_with_equal_rows_train_in_batched_matmuls_and_match_their_solo_runs(tmp_path, tiny_llama, lm_data,
                                                                                       monkeypatch):
    """Same batch size and targets: every LoRA module takes the batched path (ranks 2, 4 and 8 zero-padded to
    8), and each member still trains as it does alone."""
    members = {key: _lora(lm_settings(tiny_llama, lm_data, learning_rate=lr, batch_size=8, seed=seed, epochs=1,
                                      evals_per_epoch=2, max_steps=6), r, 2 * r)
               for key, r, lr, seed in (("a", 2, 1e-2, 1), ("b", 4, 3e-2, 2), ("c", 8, 5e-3, 3))}
    batched = []
    original = PackedLinear._batched
    monkeypatch.setattr(PackedLinear, "_batched", lambda self, *a: batched.append(1) or original(self, *a))
    solo, reports = _solo_then_packed(members, tmp_path)
    assert batched, "the batched path never ran"
    for key in members:
        assert len(reports[key]) == len(solo[key])
        for mine, theirs in zip(reports[key], solo[key]):
            for name in ("step", "train_loss", "eval_loss"):
                assert mine[name] == pytest.approx(theirs[name], rel=REL, abs=ABS), (name, mine, theirs)
        # a batched matmul sums in another order than K small ones: seen 2e-6 abs (3e-5 rel) on one of 512
        # weights after 6 steps, against updates of ~1e-2
        _assert_same_adapter(tmp_path / "packed" / key / "adapter", tmp_path / f"solo_{key}" / "adapter",
                             rtol=1e-4, atol=1e-5)
