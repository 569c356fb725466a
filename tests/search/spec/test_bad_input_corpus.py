"""Issue 6 item 4: a corpus of invalid specs and data files.

Every case goes through `peft-search run SPEC --runs-dir RUNS` in-process and must exit 2 with a line on
stderr naming the problem (its key path, or the file), before anything starts: no run directory, no
file written anywhere in the test's directory (the working directory is moved there, so a stray relative
write would be seen too), and no Ray. A case the product wrongly accepted would reach Ray: the embedded
`connect` is replaced by a failure, so such a case fails fast instead of starting a search.

The spec uses the built-in `minilm` alias: validation inspects it on the meta device (no weights read).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import pytest
import yaml
from test_spec_helpers import DELETE, merged

from search.cli import main as cli_main

TEN_MB = 10 * 1024 * 1024


# --- the workspace of one case -----------------------------------------------------------------------
def _rows(count: int, offset: int = 0, labels: Sequence[str] = ("pos", "neg")) -> List[Dict[str, Any]]:
    """Distinct texts (no overlap between train and eval), labels alternating."""
    topics = ("rivers", "engines", "gardens", "ledgers", "comets", "violins", "glaciers", "markets")
    return [{"text": f"note {offset + index} on {topics[(offset + index) % len(topics)]} number {offset + index}",
             "label": labels[index % len(labels)]} for index in range(count)]


class Workspace:
    """Inputs of one case, in `inputs/` of the test's directory: a spec and its data files."""

    def __init__(self, root):
        self.inputs = root / "inputs"
        self.runs = root / "runs"
        (self.inputs / "data").mkdir(parents=True)
        self.write_rows("data/train.jsonl", _rows(40))
        self.write_rows("data/eval.jsonl", _rows(10, offset=1000))

    def base(self) -> Dict[str, Any]:
        return {
            "name": "bad-input",
            "model": {"name_or_path": "minilm", "task": "sequence-classification"},
            "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "text_field": "text",
                     "label_field": "label", "max_length": 32},
            "peft": {"method": "lora", "target_modules": "auto"},
            "space": {"r": [2, 4], "learning_rate": {"low": 1e-4, "high": 1e-3, "log": True}},
            "training": {"epochs": 1, "batch_size": 8},
            "objective": {"metric": "eval_accuracy", "mode": "max"},
            "search": {"algorithm": "tpe", "trials": 2, "concurrency": 1, "scheduler": "asha"},
            "resources": {"workers_per_trial": 1, "gpus_per_worker": 0},
            "storage": "sqlite",
            "tracking": {"wandb": "disabled"},
        }

    def spec(self, overrides: Optional[Dict[str, Any]] = None) -> str:
        """The base spec with dotted-path overrides (DELETE removes a key), written as spec.yaml."""
        return self.spec_text(yaml.safe_dump(merged(self.base(), overrides or {}), sort_keys=False))

    def spec_text(self, text: str) -> str:
        return self.write("spec.yaml", text.encode("utf-8"))

    def write(self, name: str, content: bytes) -> str:
        path = self.inputs / name
        path.write_bytes(content)
        return str(path)

    def write_rows(self, name: str, rows: Sequence[Dict[str, Any]]) -> str:
        return self.write(name, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))

    def with_train(self, content: bytes, name: str = "data/train.jsonl", **overrides: Any) -> str:
        """A spec whose data.train is `content` (raw bytes) under `name`."""
        self.write(name, content)
        return self.spec({"data.train": name, **overrides})

    def with_rows(self, train: Sequence[Dict[str, Any]], eval_rows: Optional[Sequence[Dict[str, Any]]] = None,
                  **overrides: Any) -> str:
        self.write_rows("data/train.jsonl", train)
        if eval_rows is not None:
            self.write_rows("data/eval.jsonl", eval_rows)
        return self.spec(overrides)


def _yaml_of(workspace: Workspace, **replaced: Any) -> str:
    """The base spec as YAML text, with whole top-level values replaced (for hand-written YAML cases)."""
    return yaml.safe_dump({**workspace.base(), **replaced}, sort_keys=False)


def _alias_bomb(workspace: Workspace) -> str:
    """'Billion laughs': nine levels of nine aliases each expand to 9**9 strings when copied or printed."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for previous, level in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{level}: &{level} [{', '.join('*' + previous for _ in range(9))}]")
    return workspace.spec_text("\n".join(lines) + "\n" + _yaml_of(workspace, name="*i").replace("'*i'", "*i"))


def _duplicate_key(workspace: Workspace) -> str:
    # PyYAML keeps the last of two equal keys without a word: trials: 2 would silently become 500
    text = _yaml_of(workspace).replace("  trials: 2\n", "  trials: 2\n  trials: 500\n")
    return workspace.spec_text(text)


def _gpus_on_this_machine(workspace: Workspace) -> str:
    """More GPUs than this machine has, for an embedded run (none asked of a machine without any)."""
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return workspace.spec({"resources.gpus_per_worker": 1, "resources.workers_per_trial": have + 1})


def _runs_dir_is_a_file(workspace: Workspace) -> str:
    workspace.runs = workspace.inputs / "not-a-directory"
    workspace.runs.write_text("a file where the runs directory should be\n")
    return workspace.spec()


class Case(NamedTuple):
    id: str
    build: Callable[[Workspace], str]
    expected: Sequence[str]   # substrings of stderr; the first names the key path or the file


ONE_LABEL = [dict(row, label="pos") for row in _rows(40)]
NO_LABEL = [{"text": row["text"]} for row in _rows(40)]
NO_TEXT = [{"sentence": row["text"], "label": row["label"]} for row in _rows(40)]

CASES = [
    # --- the spec file itself
    Case("spec-missing", lambda w: str(w.inputs / "nope.yaml"), ["nope.yaml: no such spec file"]),
    Case("spec-is-a-directory", lambda w: str(w.inputs / "data"), ["cannot read the spec file"]),
    Case("empty-file", lambda w: w.spec_text(""), ["spec.yaml: the spec file is empty"]),
    Case("malformed-yaml", lambda w: w.spec_text("name: x\nmodel: [minilm\n"), ["not valid YAML at line"]),
    Case("tab-indented-yaml", lambda w: w.spec_text("name: x\nmodel:\n\tname_or_path: minilm\n"), ["not valid YAML"]),
    Case("yaml-not-a-mapping", lambda w: w.spec_text("- name\n- model\n"), ["spec: must be a mapping of sections"]),
    Case("yaml-scalar", lambda w: w.spec_text("just some words\n"), ["spec: must be a mapping of sections"]),
    Case("spec-not-utf8", lambda w: w.write("spec.yaml", b"name: caf\xe9\n"), ["cannot read the spec file"]),
    Case("python-object-tag",
         lambda w: w.spec_text(_yaml_of(w) + 'hook: !!python/object/apply:os.system ["touch pwned"]\n'),
         ["not valid YAML", "python/object/apply:os.system"]),
    Case("duplicate-key", _duplicate_key, ["search.trials: given twice"]),
    Case("alias-bomb", _alias_bomb, ["aliases expand to more than"]),
    Case("alias-to-itself", lambda w: w.spec_text(_yaml_of(w) + "loop: &loop [*loop]\n"), ["refer to themselves"]),
    # PyYAML (6.0.4 on) refuses such depth itself, before the product's own check: either way the refusal
    # names the file, the place and the nesting
    Case("deep-nesting", lambda w: w.spec_text("deep: " + "[" * 100_000 + "]" * 100_000 + "\n" + _yaml_of(w)),
         ["spec.yaml", "at line 1, column", "nest"]),
    Case("deeper-than-a-spec", lambda w: w.spec_text(_yaml_of(w) + "deep: " + "[" * 40 + "]" * 40 + "\n"),
         ["the YAML nests more than 32 levels deep"]),
    Case("huge-name", lambda w: w.spec_text(_yaml_of(w).replace("name: bad-input", "name: " + "x" * 1_000_000)),
         ["name: must be at most 128 characters"]),
    Case("huge-unknown-key", lambda w: w.spec_text(_yaml_of(w) + f'? "{"k" * 200_000}"\n: 1\n'),
         ["kkkk", "unknown key"]),
    # --- wrong types
    Case("string-for-int", lambda w: w.spec({"training.batch_size": "sixteen"}),
         ["training.batch_size: batch size must be an integer, got 'sixteen' (str)"]),
    Case("string-for-float", lambda w: w.spec({"space.learning_rate": DELETE, "training.learning_rate": "fast"}),
         ["training.learning_rate: learning rate must be a number"]),
    Case("bool-for-int", lambda w: w.spec({"search.trials": True}), ["search.trials: must be an integer, got true"]),
    Case("float-for-int", lambda w: w.spec({"search.trials": 2.5}), ["search.trials: must be an integer, got 2.5"]),
    Case("list-for-mapping", lambda w: w.spec({"resources": [1, 2]}), ["resources: must be a mapping"]),
    Case("string-for-section", lambda w: w.spec({"data": "data/train.jsonl"}), ["data: must be a mapping"]),
    Case("nan-learning-rate", lambda w: w.spec_text(_yaml_of(w).replace("low: 0.0001", "low: .nan")),
         ["space.learning_rate.low: must be a finite number, got nan"]),
    # --- values out of range
    Case("rank-zero", lambda w: w.spec({"space.r": [0, 4]}), ["space.r: rank must be >= 1, got 0"]),
    Case("negative-learning-rate", lambda w: w.spec({"space.learning_rate": DELETE, "training.learning_rate": -1e-4}),
         ["training.learning_rate: learning rate must be > 0, got -0.0001"]),
    Case("dropout-above-one", lambda w: w.spec({"space.lora_dropout": {"low": 0.0, "high": 1.5}}),
         ["space.lora_dropout.high: dropout must be < 1"]),
    Case("trials-zero", lambda w: w.spec({"search.trials": 0}), ["search.trials: must be >= 1, got 0"]),
    Case("concurrency-zero", lambda w: w.spec({"search.concurrency": 0}), ["search.concurrency: must be >= 1, got 0"]),
    Case("pack-zero", lambda w: w.spec({"search.pack": 0}), ["search.pack: must be >= 1, got 0"]),
    Case("pack-with-two-workers", lambda w: w.spec({"search.pack": 4, "resources.workers_per_trial": 2}),
         ["search.pack: 4 trials train together in one worker; got resources.workers_per_trial=2"]),
    Case("memory-cap-zero", lambda w: w.spec({"resources.memory_per_worker_gb": 0}),
         ["resources.memory_per_worker_gb: must be > 0, got 0"]),
    Case("max-length-zero", lambda w: w.spec({"data.max_length": 0}), ["data.max_length: max_length must be >= 1, got 0"]),
    Case("max-length-above-model", lambda w: w.spec({"data.max_length": 100_000}),
         ["data.max_length: must be <= 512 (the model's max_position_embeddings)"]),
    Case("batch-size-zero", lambda w: w.spec({"training.batch_size": 0}), ["training.batch_size: batch size must be >= 1, got 0"]),
    Case("workers-zero", lambda w: w.spec({"resources.workers_per_trial": 0}), ["resources.workers_per_trial: must be >= 1"]),
    Case("log-low-zero", lambda w: w.spec({"space.learning_rate": {"low": 0, "high": 1e-3, "log": True}}),
         ["space.learning_rate.low: a log range needs low > 0"]),
    Case("log-low-negative", lambda w: w.spec({"space.learning_rate": {"low": -1e-3, "high": 1e-3, "log": True}}),
         ["space.learning_rate.low:"]),
    Case("low-above-high", lambda w: w.spec({"space.learning_rate": {"low": 1e-3, "high": 1e-5}}),
         ["space.learning_rate: `low < high` must hold"]),
    # --- unknown names
    Case("unknown-method", lambda w: w.spec({"peft.method": "lorax"}), ["peft.method: unknown PEFT method 'lorax'"]),
    Case("unknown-task", lambda w: w.spec({"model.task": "question-answering"}),
         ["model.task: must be one of", "'question-answering'"]),
    Case("unknown-top-level-key", lambda w: w.spec({"bogus": 1}), ["bogus: unknown key", "known keys are: name"]),
    Case("misspelt-section", lambda w: w.spec({"serach": {"trials": 3}}), ["serach: unknown key (did you mean 'search'?)"]),
    Case("misspelt-key", lambda w: w.spec({"search.trails": 3}), ["search.trails: unknown key (did you mean 'trials'?)"]),
    Case("metric-of-other-task", lambda w: w.spec({"objective.metric": "eval_perplexity"}),
         ["objective.metric: sequence-classification reports eval_loss, eval_accuracy, eval_f1", "'eval_perplexity'"]),
    Case("mode-not-min-max", lambda w: w.spec({"objective.mode": "maximize"}),
         ["objective.mode: must be one of min, max, got 'maximize'"]),
    Case("model-dir-missing", lambda w: w.spec({"model.name_or_path": "./no-such-model"}),
         ["model.name_or_path: no such directory"]),
    # --- data files
    Case("data-file-missing", lambda w: w.spec({"data.train": "data/nope.jsonl"}), ["data.train:", "nope.jsonl: no such file"]),
    Case("data-is-a-directory", lambda w: w.spec({"data.train": "data"}), ["data.train:", "is a directory"]),
    Case("data-empty-string", lambda w: w.spec({"data.train": ""}), ["data.train: must name a data file", "empty string"]),
    # no such file and no dataset suffix: taken for an HF dataset id, which validate checks the spelling of
    Case("data-neither-file-nor-hub-id", lambda w: w.spec({"data.train": "inputs/data/train"}),
         ["data.train: 'inputs/data/train' is neither an existing local file nor an HF dataset id"]),
    Case("data-id-with-spaces", lambda w: w.spec({"data.eval": "my eval rows"}),
         ["data.eval: 'my eval rows' is neither an existing local file nor an HF dataset id"]),
    Case("empty-dataset", lambda w: w.with_train(b""), ["data.train: has no rows"]),
    Case("blank-lines-only", lambda w: w.with_train(b"\n\n  \n"), ["data.train: has no rows"]),
    Case("missing-label-column", lambda w: w.with_rows(NO_LABEL), ["data.label_field: 'label' is missing", "data.train"]),
    Case("missing-text-field", lambda w: w.with_rows(NO_TEXT), ["data.text_field: 'text' is missing",
                                                                "the rows have: label, sentence"]),
    Case("text-not-a-string", lambda w: w.with_rows([dict(row, text=index) for index, row in enumerate(_rows(40))]),
         ["data.text_field: 'text' is not a string in 40 of 40 rows of data.train"]),
    Case("non-utf8-bytes", lambda w: w.with_train(b'{"text": "caf\xe9", "label": "pos"}\n'),
         ["data.train:", "not UTF-8"]),
    Case("non-utf8-csv", lambda w: w.with_train(b"text,label\ncaf\xe9,pos\n", name="data/train.csv"),
         ["data.train:", "not UTF-8"]),
    Case("invalid-json-line", lambda w: w.with_train(b'{"text": "a", "label": "pos"}\n{"text": \n'),
         ["data.train:", "train.jsonl:2: not valid JSON"]),
    Case("ten-mb-single-line-json", lambda w: w.with_train(json.dumps(_rows(20) + [{"text": "y" * TEN_MB}]).encode()),
         ["data.train:", "train.jsonl:1: each line must be a JSON object, got list"]),
    Case("ten-mb-single-line-csv", lambda w: w.with_train(b"text,label\n" + b"z" * TEN_MB + b",pos\n", name="data/train.csv"),
         ["data.train:", "train.csv"]),
    Case("single-label-class", lambda w: w.with_rows(ONE_LABEL),
         ["data.label_field: needs at least 2 distinct labels in data.train, got only 'pos'"]),
    Case("eval-label-unseen", lambda w: w.with_rows(_rows(40), _rows(10, offset=1000, labels=("pos", "neutral"))),
         ["data.eval: labels not in data.train: neutral"]),
    Case("eval-overlaps-train", lambda w: w.with_rows(_rows(40), _rows(10)),
         ["data.eval: 10 of 10 eval rows also appear in data.train", "memorisation"]),
    Case("no-eval-row-left", lambda w: w.with_rows(_rows(3), **{"data.eval": DELETE}),
         ["data.eval_fraction: 0.2 of 3 rows leaves no eval row"]),
    # --- the run directory's name
    Case("name-dotdot-slash", lambda w: w.spec({"name": "../x"}), ["name: must match [A-Za-z0-9._-]+", "'../x'"]),
    Case("name-absolute", lambda w: w.spec({"name": "/tmp/x"}), ["name: must match", "'/tmp/x'"]),
    Case("name-with-slash", lambda w: w.spec({"name": "a/b"}), ["name: must match", "'a/b'"]),
    Case("name-dotdot", lambda w: w.spec({"name": ".."}), ["name: '..'", "parent"]),
    Case("name-dot", lambda w: w.spec({"name": "."}), ["name: '.'"]),
    Case("name-not-a-string", lambda w: w.spec({"name": ["a", "b"]}), ["name: must match"]),
    Case("runs-dir-is-a-file", _runs_dir_is_a_file, ["--runs-dir:", "not-a-directory"]),
    # --- resources and engine
    Case("gpus-on-this-machine", _gpus_on_this_machine, ["resources.gpus_per_worker:", "(embedded Ray)", "--address"]),
    Case("fractional-gpus-several-workers",
         lambda w: w.spec({"resources.workers_per_trial": 2, "resources.gpus_per_worker": 0.5}),
         ["resources.gpus_per_worker: a fraction shares one GPU between workers"]),
    Case("negative-gpus", lambda w: w.spec({"resources.gpus_per_worker": -1}), ["resources.gpus_per_worker: must be >= 0"]),
    Case("int8-with-zero3", lambda w: w.spec({"model.quantization": "int8", "resources.deepspeed": {"zero_stage": 3}}),
         ["model.quantization: int8 cannot run under ZeRO-3"]),
    Case("unknown-zero-stage", lambda w: w.spec({"resources.deepspeed": {"zero_stage": 4}}),
         ["resources.deepspeed.zero_stage: must be <= 3, got 4"]),
    Case("zero-stage-as-word", lambda w: w.spec({"resources.deepspeed": {"zero_stage": "three"}}),
         ["resources.deepspeed.zero_stage: must be an integer"]),
    Case("deepspeed-config-missing", lambda w: w.spec({"resources.deepspeed": {"config": "ds.json"}}),
         ["resources.deepspeed.config:", "ds.json"]),
    Case("storage-redis", lambda w: w.spec({"storage": "redis://localhost/0"}), ["storage: unknown scheme 'redis'"]),
    Case("storage-not-a-string", lambda w: w.spec({"storage": 5}), ["storage: must be 'sqlite' or a database URL"]),
    Case("storage-sqlite-dir-missing", lambda w: w.spec({"storage": "sqlite:////no/such/dir/study.db"}),
         ["storage: directory /no/such/dir of the sqlite file does not exist"]),
    # --- resources.storage_path: results on object storage (search/store/remote.py)
    Case("storage-path-unknown-scheme", lambda w: w.spec({"resources.storage_path": "ftp://files.example/runs"}),
         ["resources.storage_path: unknown scheme 'ftp'"]),
    Case("storage-path-credentials-in-url",
         lambda w: w.spec({"resources.storage_path": "s3://AKIAEXAMPLE:corpus-secret-key@bucket/runs"}),
         ["resources.storage_path: credentials come from the environment", "'s3://AKIAEXAMPLE:***@bucket/runs'"]),
    # nothing listens on port 1: the S3 client's retries make this case take a few seconds
    Case("storage-path-unreachable-endpoint",
         lambda w: w.spec({"resources.storage_path": "s3://bucket/runs?endpoint_override=http://127.0.0.1:1"}),
         ["resources.storage_path: cannot reach s3://bucket/runs?endpoint_override=http://127.0.0.1:1"]),
    Case("storage-path-directory-missing", lambda w: w.spec({"resources.storage_path": "no-such-results-dir"}),
         ["resources.storage_path: directory", "no-such-results-dir does not exist"]),
    Case("tracking-unknown", lambda w: w.spec({"tracking.wandb": "sometimes"}),
         ["tracking.wandb: must be one of offline, online, disabled"]),
]

# A handful that `validate` must refuse as well (its own code path: no run directory involved).
VALIDATE_IDS = ["malformed-yaml", "python-object-tag", "duplicate-key", "rank-zero", "empty-dataset",
                "single-label-class", "eval-overlaps-train", "name-dotdot", "gpus-on-this-machine", "storage-redis",
                "storage-path-unknown-scheme"]


# --- what "nothing happened" means ---------------------------------------------------------------------
def _listing(root) -> Dict[str, tuple]:
    """Every file and directory under `root`, with size and modification time (a rewrite shows too)."""
    entries = {}
    for directory, subdirs, files in os.walk(root):
        for name in subdirs + files:
            path = os.path.join(directory, name)
            stat = os.lstat(path)
            entries[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
    return entries


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture
def guarded(tmp_path, monkeypatch):
    """The case's root, as working directory; starting Ray fails the test instead of starting a search."""
    import cluster.local

    def no_ray(*_args, **_kwargs):
        pytest.fail("the spec was accepted: the search went on to start Ray")

    monkeypatch.setattr(cluster.local, "connect", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)   # the embedded case, whatever the caller's shell says
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _assert_refused(code: int, stderr: str, expected: Sequence[str], before: Dict[str, tuple], root, runs) -> None:
    assert code == 2, stderr
    for text in expected:
        assert text in stderr, f"expected {text!r} in stderr:\n{stderr[:3000]}"
    lines = stderr.strip().splitlines()
    assert lines and all(len(line) <= 2000 for line in lines), "one short line per problem, never a data dump"
    assert not os.path.exists(runs) or os.path.isfile(runs) or not os.listdir(runs)
    assert _listing(root) == before, "nothing may be written for invalid input"
    assert not _ray_started()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_run_refuses(case, guarded, capsys):
    workspace = Workspace(guarded)
    spec_path = case.build(workspace)
    before = _listing(guarded)
    capsys.readouterr()
    code = cli_main(["run", spec_path, "--runs-dir", str(workspace.runs)])
    _assert_refused(code, capsys.readouterr().err, case.expected, before, guarded, workspace.runs)


@pytest.mark.parametrize("case", [case for case in CASES if case.id in VALIDATE_IDS],
                         ids=[case.id for case in CASES if case.id in VALIDATE_IDS])
def test_validate_refuses(case, guarded, capsys):
    workspace = Workspace(guarded)
    spec_path = case.build(workspace)
    before = _listing(guarded)
    capsys.readouterr()
    code = cli_main(["validate", spec_path])
    _assert_refused(code, capsys.readouterr().err, case.expected, before, guarded, workspace.runs)


def test_corpus_is_large_and_ids_are_unique():
    assert len(CASES) >= 35
    assert len({case.id for case in CASES}) == len(CASES)
    assert set(VALIDATE_IDS) <= {case.id for case in CASES}


# --- the other side of the GPU check: a cluster's GPUs are on its nodes ---------------------------------
def _gpu_spec(workspace: Workspace) -> str:
    return workspace.spec({"resources.gpus_per_worker": 1})


def test_validate_with_an_address_leaves_gpus_to_the_cluster(guarded, capsys):
    spec_path = _gpu_spec(Workspace(guarded))
    assert cli_main(["validate", spec_path, "--address", "ray://head:10001"]) == 0, capsys.readouterr().err
    assert "valid" in capsys.readouterr().out


def test_validate_with_ray_address_in_the_environment_leaves_gpus_to_the_cluster(guarded, capsys, monkeypatch):
    spec_path = _gpu_spec(Workspace(guarded))
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert cli_main(["validate", spec_path]) == 0, capsys.readouterr().err


def test_run_with_an_address_goes_on_to_the_cluster(guarded, monkeypatch):
    """The same spec is not refused for a cluster: the search goes on to join it (stopped right there)."""
    import cluster.local

    class Joined(Exception):
        pass

    def join(address, *_args):
        raise Joined(address)

    monkeypatch.setattr(cluster.local, "connect", join)
    workspace = Workspace(guarded)
    spec = _gpu_spec(workspace)
    # an error past the checks ends the run with exit 1, its traceback in the run's log
    assert cli_main(["run", spec, "--runs-dir", str(workspace.runs), "--address", "ray://head:10001"]) == 1
    (log,) = workspace.runs.glob("*/logs/search.log")
    assert "Joined: ray://head:10001" in log.read_text()


def test_data_gone_between_validation_and_run_leaves_no_run_directory(guarded):
    """The run reads the data again (for the baseline) before it creates anything: data that vanished
    or an HF dataset that cannot be loaded is a problem naming `data`, and no run directory is left."""
    from search.spec.validate import check_file
    from search.store.rundir import RunPlace, prepare_run_dir
    from trainers.records import DataError

    workspace = Workspace(guarded)
    spec, problems, _warnings = check_file(workspace.spec())
    assert problems == []
    os.remove(workspace.inputs / "data" / "train.jsonl")
    with pytest.raises(DataError, match="train.jsonl: no such file"):
        prepare_run_dir(spec, RunPlace.of(spec, str(workspace.runs)))
    assert not workspace.runs.exists()
