"""The recipe end to end on tiny models: learning, saved adapters, reports, seeds, failures."""
import gc
import json
import math
import os
import weakref
from dataclasses import replace

import pytest
import torch
from peft import PeftModel
from trainers_helpers import METHODS, cls_settings, lm_settings, skip_refused_prefix_tuning

import trainers.recipe as recipe
from trainers.errors import TrialFailed
from trainers.inspect import inspect_model
from trainers.model import load_base

ROUND_KEYS = {"round", "rounds_total", "step", "epoch", "train_loss", "eval_loss", "tokens_per_s", "peak_mem_mb", "train_s",
              "energy_j", "trainable_params"}


@pytest.fixture
def keep_trained_model(monkeypatch):
    """Record the trained PEFT model of the next run_trial (cleanup would drop it)."""
    kept = {}
    original = recipe.cleanup

    def cleanup(trial):
        kept["model"], kept["tokenizer"] = trial.peft_model, trial.base.tokenizer
        original(trial)

    monkeypatch.setattr(recipe, "cleanup", cleanup)
    return kept


def _outputs(model, tokenizer, texts=("good plot and one cat", "bad film", "one two three four")):
    encoded = tokenizer(list(texts), padding=True, return_tensors="pt")
    encoded.pop("token_type_ids", None)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        return model(**{key: value.to(device) for key, value in encoded.items()}).logits


def _fresh_base(settings, num_labels=None):
    """The base as a new process would load it (same dtype and device as the trial's)."""
    return load_base(settings.model, num_labels=num_labels).model


@pytest.mark.parametrize("method", METHODS)
def test_classification_learns_and_saves_a_reloadable_adapter(tmp_path, tiny_bert, cls_data, keep_trained_model,
                                                               method):
    reports = []
    settings = cls_settings(tiny_bert, cls_data, method, epochs=4)
    if method == "prefix-tuning" and inspect_model(tiny_bert, "sequence-classification").prefix_tuning_problem:
        with pytest.raises(ValueError, match="peft.method: prefix-tuning cannot train"):
            recipe.run_trial(settings, reports.append, str(tmp_path))
        assert reports == []
        return
    final = recipe.run_trial(settings, reports.append, str(tmp_path))
    assert [r["round"] for r in reports] == [1, 2, 3, 4]
    assert final == reports[-1]
    # chance is 0.5; prompt and prefix tuning of a random tiny encoder are the slowest learners (~0.75)
    assert final["eval_accuracy"] >= 0.65 and final["eval_loss"] < reports[0]["eval_loss"] - 0.05, reports
    assert reports[-1]["train_loss"] < reports[0]["train_loss"]

    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert (saved.pop("engine"), saved.pop("world_size")) == ("plain", 1)  # no process group: no DeepSpeed
    assert saved == pytest.approx(final)
    assert final["adapter_mb"] == pytest.approx(os.path.getsize(adapter / "adapter_model.safetensors") / 2 ** 20)

    reloaded = PeftModel.from_pretrained(_fresh_base(settings, num_labels=2), str(adapter))
    tokenizer = keep_trained_model["tokenizer"]
    assert torch.equal(_outputs(reloaded, tokenizer), _outputs(keep_trained_model["model"], tokenizer))


@pytest.mark.parametrize("method", METHODS)
def test_causal_lm_learns_and_saves_a_reloadable_adapter(tmp_path, tiny_llama, lm_data, keep_trained_model, method):
    reports = []
    settings = lm_settings(tiny_llama, lm_data, method)
    final = recipe.run_trial(settings, reports.append, str(tmp_path))
    untrained = math.log(keep_trained_model["tokenizer"].vocab_size)   # uniform guess over the vocabulary
    assert final["eval_loss"] < untrained - 0.1 and final["eval_loss"] < reports[0]["eval_loss"], reports
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    reloaded = PeftModel.from_pretrained(_fresh_base(settings), str(tmp_path / "adapter"))
    tokenizer = keep_trained_model["tokenizer"]
    assert torch.equal(_outputs(reloaded, tokenizer), _outputs(keep_trained_model["model"], tokenizer))


def test_reports_once_per_round_with_all_keys(tmp_path, tiny_bert, cls_data):
    reports = []
    settings = cls_settings(tiny_bert, cls_data, epochs=2, evals_per_epoch=2, gradient_accumulation_steps=2)
    final = recipe.run_trial(settings, reports.append, str(tmp_path))
    assert len(reports) == 4
    for number, report in enumerate(reports, start=1):
        assert ROUND_KEYS | {"eval_accuracy", "eval_f1"} <= set(report)
        assert report["round"] == number and report["tokens_per_s"] > 0 and report["train_s"] > 0
        assert report["peak_mem_mb"] > 0 and report["trainable_params"] > 0
    # 192 train rows / 16 = 12 micro-batches per epoch = 6 optimizer steps; rounds every 3 steps
    assert [r["step"] for r in reports] == [3, 6, 9, 12]
    assert [r["epoch"] for r in reports] == [0.5, 1.0, 1.5, 2.0]
    assert "adapter_mb" in final and all("adapter_mb" not in r for r in reports[:-1])


def test_max_steps_caps_the_trial(tmp_path, tiny_bert, cls_data):
    reports = []
    recipe.run_trial(cls_settings(tiny_bert, cls_data, epochs=3, max_steps=5), reports.append, str(tmp_path))
    assert [r["step"] for r in reports] == [2, 4, 5]


def test_same_seed_same_metrics(tmp_path, tiny_bert, cls_data):
    def run(seed, out):
        reports = []
        recipe.run_trial(cls_settings(tiny_bert, cls_data, "lora", epochs=1, seed=seed), reports.append,
                         str(tmp_path / out))
        return [{key: value for key, value in r.items() if key.startswith(("eval", "train_loss"))} for r in reports]

    first = run(0, "a")
    assert run(0, "b") == first
    assert run(1, "c") != first


def test_lent_base_gives_the_same_result_and_is_restored(tmp_path, tiny_bert, cls_data):
    settings = cls_settings(tiny_bert, cls_data, "lora", epochs=1)
    fresh = []
    recipe.run_trial(settings, fresh.append, str(tmp_path / "fresh"))
    torch.manual_seed(settings.training.seed)   # the head init of the lent base, as the recipe seeds it
    base = load_base(settings.model, num_labels=2)
    for method in ("prompt-tuning", "lora"):     # another method first: the base must come back clean
        lent = []
        recipe.run_trial(replace(settings, peft=replace(settings.peft, method=method, params=cls_settings(
            tiny_bert, cls_data, method).peft.params)), lent.append, str(tmp_path / method), base=base)
    strip = lambda reports: [{k: v for k, v in r.items() if k.startswith("eval")} for r in reports]  # noqa: E731
    assert strip(lent) == strip(fresh)
    assert not hasattr(base.model, "peft_config")


def test_divergence_fails_the_trial(tmp_path, tiny_bert, cls_data):
    settings = cls_settings(tiny_bert, cls_data, "lora", learning_rate=1e6, max_grad_norm=0.0, warmup_ratio=0.0)
    with pytest.raises(TrialFailed, match=r"^diverged at step \d+ \(loss=\S+\)$") as failure:
        recipe.run_trial(settings, lambda metrics: None, str(tmp_path))
    assert failure.value.reason.startswith("diverged at step")


def test_exploding_but_finite_loss_also_diverges(tmp_path, tiny_bert, cls_data):
    # gradient clipping keeps the loss finite here; it explodes instead
    settings = cls_settings(tiny_bert, cls_data, "lora", learning_rate=1e9, warmup_ratio=0.0)
    with pytest.raises(TrialFailed, match=r"^diverged at step 2 \(loss=\d\.\d+e\+\d+\)$"):
        recipe.run_trial(settings, lambda metrics: None, str(tmp_path))


def test_forced_nan_fails_at_that_step(tmp_path, tiny_llama, lm_data, monkeypatch):
    calls = {"n": 0}
    original = recipe.train

    def poisoned_loss(trial, end_step):
        model = trial.engine.model
        if not hasattr(model, "_poisoned"):
            forward = model.forward

            def forward_with_nan(*args, **kwargs):
                outputs = forward(*args, **kwargs)
                calls["n"] += 1
                if model.training and calls["n"] == 3:
                    outputs.loss = outputs.loss * float("nan")
                return outputs

            model.forward, model._poisoned = forward_with_nan, True
        original(trial, end_step)

    monkeypatch.setattr(recipe, "train", poisoned_loss)
    with pytest.raises(TrialFailed, match=r"diverged at step 3 \(loss=nan\)"):
        recipe.run_trial(lm_settings(tiny_llama, lm_data, "lora"), lambda metrics: None, str(tmp_path))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"),
                                   MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_out_of_memory_fails_the_trial(tmp_path, tiny_bert, cls_data, monkeypatch, error):
    def out_of_memory(batch, device):
        raise error

    monkeypatch.setattr(recipe, "_to_device", out_of_memory)
    with pytest.raises(TrialFailed, match=r"^out of memory at step 1: CUDA out of memory. Tried to allocate 2.00 GiB$"):
        recipe.run_trial(cls_settings(tiny_bert, cls_data), lambda metrics: None, str(tmp_path))


def test_other_errors_are_not_trial_failures(tmp_path, tiny_bert, cls_data, monkeypatch):
    def broken(batch, device):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(recipe, "_to_device", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        recipe.run_trial(cls_settings(tiny_bert, cls_data), lambda metrics: None, str(tmp_path))


def test_qlora_nf4_trial_on_cpu(tmp_path, tiny_llama, lm_data):
    pytest.importorskip("bitsandbytes")
    reports = []
    final = recipe.run_trial(lm_settings(tiny_llama, lm_data, "lora", quantization="nf4", epochs=1, max_steps=6),
                             reports.append, str(tmp_path))
    assert len(reports) == 1 and math.isfinite(final["eval_loss"])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_runs_one_trial(tmp_path, tiny_bert, cls_data, capsys):
    settings = {"model": {"name_or_path": tiny_bert}, "data": {"train": cls_data, "max_length": 32},
                "peft": {"method": "lora", "params": {"r": 2, "target_modules": ["query", "value"]}},
                "training": {"epochs": 1, "max_steps": 2, "batch_size": 8}, "engine": {"num_threads": 1}}
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    assert recipe.main(["--settings", str(path), "--out", str(tmp_path / "out")]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and printed[0]["step"] == 2
    assert (tmp_path / "out" / "metrics.json").is_file()

    path.write_text(json.dumps({**settings, "training": {"epoch": 1}, "extra": 1}))
    assert recipe.main(["--settings", str(path), "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err
    assert "training.epoch: unknown key; known: learning_rate, epochs" in error and "extra: unknown section" in error


def test_plateau_stops_the_trial_early_as_a_finished_trial(tmp_path, tiny_bert, cls_data):
    # learning rate 0: every round evaluates the same weights, so the metric cannot improve after round 1
    settings = cls_settings(tiny_bert, cls_data, "lora", epochs=4, learning_rate=0.0, early_stopping_patience=1,
                            early_stopping_min_delta=0.001, monitor="eval_accuracy", monitor_mode="max")
    reports = []
    final = recipe.run_trial(settings, reports.append, str(tmp_path))
    assert [r["round"] for r in reports] == [1, 2]
    assert [r["rounds_total"] for r in reports] == [4, 2]   # the last report: a finished trial, not a pruned one
    assert final == reports[-1]
    assert final["stopped_early"] == ("plateau: eval_accuracy did not improve by > 0.001 for 1 rounds "
                                      "(stopped after round 2 of 4)")
    assert "stopped_early" not in reports[0] and "adapter_mb" not in reports[0]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["stopped_early"] == final["stopped_early"] and saved["rounds_total"] == 2
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # an untouched LoRA update (B is zero at init) has no rank at all
    assert final["diag_effective_rank"] == 0.0 and final["diag_effective_rank_ratio"] == 0.0


def test_patience_counts_rounds_without_improvement(tmp_path, tiny_bert, cls_data):
    settings = cls_settings(tiny_bert, cls_data, "lora", epochs=4, learning_rate=0.0, early_stopping_patience=2)
    reports = []
    recipe.run_trial(settings, reports.append, str(tmp_path))   # watches eval_loss (min) by default
    assert [r["round"] for r in reports] == [1, 2, 3] and reports[-1]["rounds_total"] == 3
    assert "eval_loss did not improve by > 0 for 2 rounds (stopped after round 3 of 4)" in reports[-1]["stopped_early"]


def test_no_plateau_stop_without_patience_or_while_improving(tmp_path, tiny_bert, cls_data):
    flat = []
    recipe.run_trial(cls_settings(tiny_bert, cls_data, "lora", epochs=3, learning_rate=0.0), flat.append,
                     str(tmp_path / "flat"))
    learning = []
    recipe.run_trial(cls_settings(tiny_bert, cls_data, "lora", epochs=3, early_stopping_patience=1), learning.append,
                     str(tmp_path / "learning"))
    for reports in (flat, learning):
        assert [r["round"] for r in reports] == [1, 2, 3] and reports[-1]["rounds_total"] == 3
        assert not any("stopped_early" in r for r in reports)
    assert learning[-1]["eval_loss"] < learning[1]["eval_loss"] < learning[0]["eval_loss"]


def test_bad_plateau_settings_are_rejected_before_the_trial_starts(tmp_path, tiny_bert, cls_data):
    with pytest.raises(ValueError, match=r"training.early_stopping_patience must be >= 1 or None, got 0"):
        recipe.run_trial(cls_settings(tiny_bert, cls_data, early_stopping_patience=0), print, str(tmp_path))
    with pytest.raises(ValueError, match=r"training.monitor: 'eval_perplexity' is not among this trial's metrics "
                                         r"\(eval_accuracy, eval_f1, eval_loss\)"):
        recipe.run_trial(cls_settings(tiny_bert, cls_data, early_stopping_patience=1, monitor="eval_perplexity"),
                         print, str(tmp_path))


@pytest.mark.parametrize("method", METHODS)
def test_last_round_reports_diagnostics(tmp_path, tiny_bert, cls_data, method):
    skip_refused_prefix_tuning(method, tiny_bert)
    reports = []
    settings = cls_settings(tiny_bert, cls_data, method, epochs=2)
    final = recipe.run_trial(settings, reports.append, str(tmp_path))
    assert not any(key.startswith("diag_") for key in reports[0])
    assert final["diag_overfit_gap"] == pytest.approx(final["eval_loss"] - final["train_loss"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert {key for key in saved if key.startswith("diag_")} == {key for key in final if key.startswith("diag_")}
    if method == "lora":   # r = 4 on query and value of 2 layers, trained: some but at most 4 directions
        assert 1.0 < final["diag_effective_rank"] <= 4.0
        assert final["diag_effective_rank_ratio"] == pytest.approx(final["diag_effective_rank"] / 4)
    else:
        assert "diag_effective_rank" not in final and "diag_effective_rank_ratio" not in final


class _Stopped(Exception):
    """Stands for ASHA stopping a trial in its report."""


def _stop(metrics):
    raise _Stopped


@pytest.mark.parametrize("ending", ["stopped in a report", "diverged in a step"])
def test_an_interrupted_trial_keeps_nothing_of_its_own_alive(tmp_path, tiny_bert, cls_data, monkeypatch, ending):
    """Engine, optimizer, adapter and an owned base are freed although the caller still holds the exception
    (on a GPU, the memory the next trial needs: tests/trainers/test_gpu.py measures it there)."""
    refs = {}
    original = recipe.cleanup

    def cleanup(trial):
        refs.update(engine=weakref.ref(trial.engine), optimizer=weakref.ref(trial.engine.optimizer),
                    adapter=weakref.ref(trial.peft_model), base=weakref.ref(trial.base.model))
        original(trial)

    monkeypatch.setattr(recipe, "cleanup", cleanup)
    if ending == "stopped in a report":
        settings, report, error = cls_settings(tiny_bert, cls_data, "lora", epochs=2), _stop, _Stopped
    else:   # raised inside train(), whose frame holds the engine and the last batch's outputs
        settings = cls_settings(tiny_bert, cls_data, "lora", learning_rate=1e9, warmup_ratio=0.0)
        report, error = (lambda metrics: None), TrialFailed
    with pytest.raises(error) as interrupted:
        recipe.run_trial(settings, report, str(tmp_path))
    gc.collect()
    assert interrupted.value is not None
    assert {name: ref() is None for name, ref in refs.items()} == dict.fromkeys(refs, True)


def test_fp16_trains_as_mixed_precision(tmp_path, tiny_bert, cls_data, keep_trained_model):
    """fp16 weights in the base, fp32 trained weights (the head too), autocast and loss scaling: it learns."""
    settings = cls_settings(tiny_bert, cls_data, "lora", epochs=4)
    reports = []
    final = recipe.run_trial(replace(settings, model=replace(settings.model, dtype="float16")), reports.append,
                             str(tmp_path))
    assert final["eval_accuracy"] >= 0.65 and final["eval_loss"] < reports[0]["eval_loss"] - 0.05, reports
    dtypes = {(param.requires_grad, param.dtype) for param in keep_trained_model["model"].parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.float16)}


def _leaking_train(monkeypatch, chunk_mb: int):
    """recipe.train that also keeps `chunk_mb` of host memory per round alive: a trial whose memory grows."""
    kept = []
    original = recipe.train

    def leaking(trial, end_step):
        for _ in range(4):   # in steps, so the watchdog sees the growth while Python code runs
            kept.append(torch.ones(chunk_mb * 2 ** 18))   # float32: 4 bytes each
            original(trial, end_step)
    monkeypatch.setattr(recipe, "train", leaking)
    return kept


def test_host_memory_over_the_cap_fails_the_trial_with_its_reason(tmp_path, tiny_bert, cls_data, monkeypatch):
    import psutil

    cap_mb = psutil.Process().memory_info().rss / 2 ** 20 + 200
    settings = cls_settings(tiny_bert, cls_data)
    settings = replace(settings, engine=replace(settings.engine, host_memory_mb=cap_mb))
    # the same trial under the same cap finishes when its memory stays flat: the cap leaves normal training be
    assert math.isfinite(recipe.run_trial(settings, lambda metrics: None, str(tmp_path / "flat"))["eval_loss"])

    kept = _leaking_train(monkeypatch, chunk_mb=64)
    # the cap is crossed in a step, or, where the leak left it just below, in the checkpoint that follows
    with pytest.raises(TrialFailed, match=r"^out of memory at (step \d+|checkpoint after round \d+): host memory: "
                                          r"this worker's resident memory "
                                          r"reached \d+ MiB, over its \d+ MiB cap \(resources.memory_per_worker_gb\)$"):
        recipe.run_trial(settings, lambda metrics: None, str(tmp_path / "leaking"))
    assert 0 < len(kept) * 64 < 200 + 2 * 64   # stopped within a few chunks of the cap, not at the end of training
