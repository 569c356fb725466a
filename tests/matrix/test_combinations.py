"""The combination matrix as a contract: every combination the spec accepts trains, or `validate` refuses it.

The axes come from the product's own registries (tasks, PEFT methods, quantizations, the ZeRO stages the spec
allows, one and two workers, packed or not), so a value added to any of them lands here untested and fails
the test until verdicts.txt says what it does. Each combination is written as a spec and validated as a user's
would be; an accepted one trains two optimizer steps and evaluates on tiny models, through the same settings
the search would give its trial. The trained ones share worker groups (of one rank or two) that run
combination after combination, as the search's worker groups run trial after trial.

verdicts.txt holds the verdict of every combination ("trains" or "refused: <first reason>") with the versions
in constraints.txt (some refusals depend on the installed transformers and PEFT). A change of
verdict fails the test with the difference; `PEFT_SEARCH_WRITE_VERDICTS=1 pytest tests/matrix` rewrites
the file after a deliberate change.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest
import yaml

from ranks import run_ranks
from search.spec.sections import DeepSpeedSection
from search.spec.validate import validate_file
from spaces.methods import method_names
from trainers.settings import QUANTIZATIONS, TASKS
from trainers.settings_io import settings_to_dict
from trainers.tiny_models import (build_tiny_causal_lm, build_tiny_classifier, build_tiny_token_classifier,
                                  make_learnable_classification_data, make_learnable_token_data)

pytest.importorskip("deepspeed")
pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
WORKER = HERE / "matrix_worker.py"
VERDICTS = HERE / "verdicts.txt"
_STAGES = DeepSpeedSection.__dataclass_fields__["zero_stage"].metadata   # the ZeRO stages the spec accepts
ENGINES = ("plain",) + tuple(f"zero{stage}" for stage in range(int(_STAGES["low"]), int(_STAGES["high"]) + 1))
WORKERS = (1, 2)
PACKS = (1, 2)
# A search's worker group runs one task, method and engine, trial after trial. Here one group runs many
# different ones in turn, and a gloo group of 2 ranks that had run ~80 such trials once hung in DeepSpeed's
# all-gather; groups are kept to a task and a bounded number of trials each.
TRIALS_PER_GROUP = 30


class Combination(NamedTuple):
    task: str
    method: str
    quantization: str
    engine: str
    workers: int
    pack: int

    def __str__(self) -> str:
        return f"{self.task} {self.method} {self.quantization} {self.engine} workers={self.workers} pack={self.pack}"


def every_combination() -> List[Combination]:
    return [Combination(*values) for values in itertools.product(TASKS, method_names(), QUANTIZATIONS, ENGINES,
                                                                 WORKERS, PACKS)]


def spec_of(combination: Combination, world: Dict[str, str]) -> dict:
    classify = combination.task == "sequence-classification"
    tokens = combination.task == "token-classification"
    peft = {"method": combination.method}
    if combination.method in ("lora", "ia3"):
        peft["target_modules"] = "auto"
    deepspeed = {"enabled": False} if combination.engine == "plain" else \
        {"enabled": True, "zero_stage": int(combination.engine[len("zero"):])}
    return {
        "name": "matrix",
        "model": {"name_or_path": world["classifier" if classify else "tagger" if tokens else "llama"],
                  "task": combination.task, "quantization": combination.quantization},
        "data": {"train": world["tags_train" if tokens else "train"], "eval": world["tags_eval" if tokens else "eval"],
                 "max_length": 16, **({} if tokens else {"text_field": "text"}),
                 **({"label_field": "label"} if classify else {})},
        "peft": peft,
        "space": {"learning_rate": [1.0e-2]},
        "training": {"epochs": 1, "batch_size": 4, "max_steps": 2},
        "objective": {"metric": "eval_loss", "mode": "min"},
        "search": {"algorithm": "tpe", "trials": 2, "concurrency": 1, "scheduler": "none", "pack": combination.pack},
        "resources": {"workers_per_trial": combination.workers, "gpus_per_worker": 0, "deepspeed": deepspeed},
        "storage": "sqlite",
        "tracking": {"wandb": "disabled"},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Dict[str, str]:
    root = tmp_path_factory.mktemp("matrix_world")
    return {
        "classifier": build_tiny_classifier(str(root / "bert"), num_labels=2, seed=0),
        "llama": build_tiny_causal_lm(str(root / "llama"), arch="llama", seed=0),
        "train": make_learnable_classification_data(str(root / "train.jsonl"), 16, seed=0),
        "eval": make_learnable_classification_data(str(root / "eval.jsonl"), 8, seed=1),
        # token-classification: 5 tags (B-/I- of POS and NEG, O), in both splits of these seeds
        "tagger": build_tiny_token_classifier(str(root / "bert_tagger"), num_labels=5, seed=0),
        "tags_train": make_learnable_token_data(str(root / "tags_train.jsonl"), 16, seed=0),
        "tags_eval": make_learnable_token_data(str(root / "tags_eval.jsonl"), 8, seed=1),
    }


def validated(world, tmp_path) -> Dict[Combination, object]:
    """Combination -> the trial settings its spec gives, or the first reason `validate` refuses it with."""
    out = {}
    for number, combination in enumerate(every_combination()):
        path = tmp_path / f"spec{number}.yaml"
        path.write_text(yaml.safe_dump(spec_of(combination, world)))
        spec, problems = validate_file(str(path))
        out[combination] = f"refused: {problems[0]}" if problems else spec.trial_settings({})
    return out


def run_group(jobs: List[dict], world_size: int, out: Path) -> Dict[int, dict]:
    """Run `jobs` on a group of `world_size` ranks, a new group after each failure; index -> rank 0's result."""
    results: Dict[int, dict] = {}
    pending = list(jobs)
    while pending:
        (out / "jobs.json").write_text(json.dumps(pending))
        ends = run_ranks([WORKER, out / "jobs.json", out], world_size, timeout=900, env={"OMP_NUM_THREADS": "1"})
        tails = [end.output[-3000:] for end in ends]
        for position, job in enumerate(pending):
            found = [json.loads(path.read_text()) for path in sorted(out.glob(f"result-*-{job['index']}.json"))]
            failed = [result for result in found if "error" in result]
            if not failed and len(found) == world_size:
                results[job["index"]] = found[0]
                continue
            # a failed job ends the group: the jobs after it run in a new one
            results[job["index"]] = failed[0] if failed else \
                {"error": "the worker group ended without a result: " + tails[0][-1500:]}
            pending = pending[position + 1:]
            break
        else:
            pending = []
    return results


def _verdict(result: dict) -> str:
    if "error" in result:
        return f"fails: {result['error'].splitlines()[0][:300]}"
    loss = result["metrics"].get("eval_loss")
    return "trains" if loss is not None and math.isfinite(loss) else f"fails: eval_loss={loss}"


def test_every_accepted_combination_trains_and_every_other_is_refused(world, tmp_path):
    outcome = validated(world, tmp_path)
    accepted = [(combination, settings) for combination, settings in outcome.items() if not isinstance(settings, str)]
    verdicts = {combination: value for combination, value in outcome.items() if isinstance(value, str)}
    for world_size, task in itertools.product(WORKERS, TASKS):
        jobs = [{"index": index, "settings": settings_to_dict(settings), "pack": combination.pack}
                for index, (combination, settings) in enumerate(accepted)
                if (combination.workers, combination.task) == (world_size, task)]
        for start in range(0, len(jobs), TRIALS_PER_GROUP):
            out = tmp_path / f"group-{world_size}-{task}-{start}"
            out.mkdir()
            for index, result in run_group(jobs[start:start + TRIALS_PER_GROUP], world_size, out).items():
                verdicts[accepted[index][0]] = _verdict(result)

    lines = [f"{combination}: {verdicts[combination]}" for combination in every_combination()]
    failing = [line for line in lines if ": fails: " in line]
    if os.environ.get("PEFT_SEARCH_WRITE_VERDICTS") and not failing:
        VERDICTS.write_text("\n".join(lines) + "\n")
    expected = VERDICTS.read_text().splitlines() if VERDICTS.is_file() else []
    assert not failing, "accepted by validate, but failed to train:\n" + "\n".join(failing)
    changed = sorted(set(lines) ^ set(expected))
    assert not changed, ("verdicts differ from tests/matrix/verdicts.txt (- expected, + now):\n" +
                         "\n".join(("+ " if line in lines else "- ") + line for line in changed))
