"""Token classification (NER): reading CoNLL and JSON lines rows, bad rows named, tags aligned to sub-words on the
real MiniLM tokenizer, entity-level metrics equal to seqeval's, and LoRA / IA3 / prefix tuning training a tiny
BERT token classifier (prompt tuning refused, packed LoRA trials equal to their solo runs)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from trainers_helpers import BERT_PARAMS, LEARNING_RATES, packed_reports, skip_refused_prefix_tuning

from trainers import recipe
from trainers.adapters import build_peft_config
from trainers.data import IGNORE_INDEX, KEEP, read_trial_rows, split_records
from trainers.hub import resolve_model_path
from trainers.metrics import EvalCounts
from trainers.model import load_base
from trainers.records import DataError
from trainers.settings import DataSettings, EngineSettings, ModelSettings, PeftSettings, TrainingSettings, TrialSettings
from trainers.tiny_models import build_tiny_token_classifier, make_learnable_token_data
from trainers.token_data import TAG_NAMES, read_conll, tokenize_token_rows
from trainers.token_metrics import TokenCounts

TASK = "token-classification"
TAGS = ["B-NEG", "B-POS", "I-NEG", "I-POS", "O"]   # make_learnable_token_data's, sorted


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(path, rows):
    return _write(path, "".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def tiny_ner(tmp_path_factory):
    return build_tiny_token_classifier(str(tmp_path_factory.mktemp("tiny") / "bert_ner"), num_labels=len(TAGS))


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory):
    return make_learnable_token_data(str(tmp_path_factory.mktemp("data") / "ner.jsonl"), n=160, seed=0)


def _settings(model, data, method="lora", **training):
    training = {"learning_rate": LEARNING_RATES[method], "epochs": 2, "batch_size": 16, **training}
    return TrialSettings(model=ModelSettings(model, task=TASK),
                         data=DataSettings(data, label_field=None, max_length=32),
                         peft=PeftSettings(method, BERT_PARAMS[method]), training=TrainingSettings(**training),
                         engine=EngineSettings(num_threads=1))


# --- reading and checking ----------------------------------------------------------------------------
def test_conll_rows_skip_docstart_and_take_the_last_column(tmp_path):
    path = _write(tmp_path / "train.conll", "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
                                            "German JJ B-NP B-MISC\n\n\nPeter NNP B-NP B-PER\n"
                                            "Blackburn NNP I-NP I-PER\n")
    rows = read_conll(path)
    assert list(rows) == [{"tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]},
                          {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}]
    assert rows.where(1) == f"{path}, row 2 (line 8)"
    bad = _write(tmp_path / "bad.conll", "EU B-ORG\nrejects\n")
    with pytest.raises(DataError, match=r"bad\.conll:2: a CoNLL line needs a word and its tag"):
        read_conll(bad)


def test_jsonl_rows_give_a_sorted_tag_set_and_an_unseen_eval_tag_is_named(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"words": ["raise", "ValueError"], "labels": ["O", "B-EXC"]},
                                              {"words": ["None", "is", "fine"], "labels": ["B-CONST", "O", "O"]}])
    good_eval = _jsonl(tmp_path / "eval.jsonl", [{"words": ["True"], "labels": ["B-CONST"]}])
    data = DataSettings(train, eval=good_eval, label_field=None, tokens_field="words", tags_field="labels")
    rows = read_trial_rows(data, TASK)
    assert rows.labels == {"B-CONST": 0, "B-EXC": 1, "O": 2}
    assert rows.format == "tokens" and rows.eval[0]["words"] == ["True"]
    bad_eval = _jsonl(tmp_path / "bad_eval.jsonl", [{"words": ["x"], "labels": ["O"]},
                                                    {"words": ["open()"], "labels": ["B-FUNC"]}])
    with pytest.raises(DataError, match=r"bad_eval\.jsonl, row 2, field labels: tag\(s\) B-FUNC do not occur in train"):
        read_trial_rows(replace(data, eval=bad_eval), TASK)


@pytest.mark.parametrize("row, field, what", [
    ({"tokens": ["a", "b", "c"], "tags": ["O", "O"]}, "tags", "has 2 tags for 3 words"),
    ({"tokens": ["a", "b"], "tags": ["O", 3]}, r"tags\[1\]", r"must be a string, got a number \(3\)"),
    ({"tokens": ["a", "b"], "tags": ["O", "PER"]}, r"tags\[1\]", "'PER' is not a BIO tag"),
    ({"tokens": "a b", "tags": ["O", "O"]}, "tokens", "must be a list of strings, got a string"),
    ({"text": "a b"}, "tokens", r"missing \(data.tokens_field\)"),
])
def test_a_bad_row_is_named_by_file_row_and_field(tmp_path, row, field, what):
    good = {"tokens": ["x", "y"], "tags": ["B-A", "O"]}
    path = _jsonl(tmp_path / "train.jsonl", [good, good, row, good])
    with pytest.raises(DataError, match=rf"train\.jsonl, row 3, field {field}: {what}"):
        split_records(DataSettings(path, label_field=None), TASK)


# --- sub-word alignment ---------------------------------------------------------------------------------
def test_the_first_sub_token_of_each_word_carries_its_tag_on_the_minilm_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    labels = {"B-EXC": 0, "B-FUNC": 1, "I-FUNC": 2, "O": 3}
    row = {"tokens": ["Raise", "ValueError", "from", "join", "()"], "tags": ["O", "B-EXC", "O", "B-FUNC", "I-FUNC"]}
    [example] = tokenize_token_rows([row], tokenizer, DataSettings("x", label_field=None), labels)
    # checked by hand: WordPiece splits ValueError into three pieces and "()" into two
    assert tokenizer.convert_ids_to_tokens(example["input_ids"]) == \
        ["[CLS]", "raise", "value", "##er", "##ror", "from", "join", "(", ")", "[SEP]"]
    assert example["labels"] == [-100, 3, 0, -100, -100, 3, 1, 2, -100, -100]
    # cut at max_length: the words that do not fit carry no label at all
    [cut] = tokenize_token_rows([row], tokenizer, DataSettings("x", label_field=None, max_length=5), labels)
    assert cut["labels"] == [-100, 3, 0, -100, -100]


# --- metrics ----------------------------------------------------------------------------------------
NAMES = ("B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O")
GOLD = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"], ["O", "B-ORG", "I-ORG"]]
GUESS = [["B-PER", "I-PER", "O", "B-ORG"], ["B-LOC", "O", "O"], ["I-ORG", "I-ORG", "I-ORG"]]


def _batch(gold, guess, keep=None):
    """Labels with a sub-token (IGNORE_INDEX) after each word's first one and right padding, and logits whose
    argmax is `guess` at the labelled positions."""
    width = 2 * max(len(row) for row in gold) + 2
    labels = torch.full((len(gold), width), IGNORE_INDEX)
    logits = torch.randn(len(gold), width, len(NAMES), generator=torch.Generator().manual_seed(0))
    for row, (tags, guessed) in enumerate(zip(gold, guess)):
        for word, (tag, said) in enumerate(zip(tags, guessed)):
            labels[row, 1 + 2 * word] = NAMES.index(tag)
            logits[row, 1 + 2 * word, NAMES.index(said)] += 10.0
    batch = {"labels": labels, TAG_NAMES: NAMES, KEEP: torch.tensor(keep or [1.0] * len(gold))}
    return logits, batch


def test_entity_scores_match_a_hand_count_and_seqeval():
    logits, batch = _batch(GOLD + [GOLD[0]], GUESS + [GOLD[0]], keep=[1.0, 1.0, 1.0, 0.0])   # a KEEP=0 duplicate
    counts = EvalCounts(TASK, len(NAMES))
    counts.add(logits, batch)
    metrics = counts.reduced().metrics()
    # by hand: gold PER(0-1) LOC(3) | LOC(0) PER(2) | ORG(1-2); guessed PER(0-1) ORG(3) | LOC(0) | ORG(0-2)
    # (seqeval: an I- after O starts an entity); found PER(0-1) and LOC(0): 2 of 4 guessed, 2 of 5 gold
    assert metrics["eval_precision"] == pytest.approx(0.5)
    assert metrics["eval_recall"] == pytest.approx(0.4)
    assert metrics["eval_f1"] == pytest.approx(2 * 0.5 * 0.4 / 0.9)
    assert metrics["eval_f1_PER"] == pytest.approx(2 / 3) and metrics["eval_f1_LOC"] == pytest.approx(2 / 3)
    assert metrics["eval_f1_ORG"] == 0.0
    assert metrics["eval_accuracy"] == pytest.approx(6 / 10)   # words right: 3 of 4, 2 of 3, 1 of 3
    labelled = batch["labels"][:3] != IGNORE_INDEX
    expected_loss = F.cross_entropy(logits[:3][labelled], batch["labels"][:3][labelled])
    assert metrics["eval_loss"] == pytest.approx(float(expected_loss), rel=1e-6)
    # seqeval on the same sequences
    assert metrics["eval_f1"] == pytest.approx(f1_score(GOLD, GUESS), abs=1e-12)
    assert metrics["eval_precision"] == pytest.approx(precision_score(GOLD, GUESS), abs=1e-12)
    assert metrics["eval_recall"] == pytest.approx(recall_score(GOLD, GUESS), abs=1e-12)
    report = classification_report(GOLD, GUESS, output_dict=True, zero_division=0)
    for kind in ("LOC", "ORG", "PER"):
        assert metrics[f"eval_f1_{kind}"] == pytest.approx(report[kind]["f1-score"], abs=1e-12)


def test_counts_summed_over_ranks_give_seqeval_on_all_rows():
    rng = torch.Generator().manual_seed(1)
    gold, guess = [], []
    for _ in range(40):   # random BIO sequences, ill-formed ones (I- after O) included
        length = int(torch.randint(1, 9, (1,), generator=rng))
        gold.append([NAMES[int(i)] for i in torch.randint(0, len(NAMES), (length,), generator=rng)])
        guess.append([NAMES[int(i)] for i in torch.randint(0, len(NAMES), (length,), generator=rng)])
    shards = []
    for rank in range(3):   # as eval_shard deals rows out: rank, rank + 3, ...
        counts = TokenCounts()
        logits, batch = _batch(gold[rank::3], guess[rank::3])
        counts.add(logits, batch["labels"], batch[KEEP], NAMES)
        shards.append(counts.as_list())
    total = TokenCounts(NAMES).from_list([sum(values) for values in zip(*shards)]).metrics()
    assert total["eval_f1"] == pytest.approx(f1_score(gold, guess), abs=1e-12)
    report = classification_report(gold, guess, output_dict=True, zero_division=0)
    for kind in ("LOC", "ORG", "PER"):
        assert total[f"eval_f1_{kind}"] == pytest.approx(report[kind]["f1-score"], abs=1e-12)


# --- training ---------------------------------------------------------------------------------------
def _reports(settings, tmp_path):
    reports = []
    recipe.run_trial(settings, reports.append, str(tmp_path))
    return reports


def test_lora_learns_the_tags_and_reports_every_metric(tmp_path, tiny_ner, ner_data):
    reports = _reports(_settings(tiny_ner, ner_data, epochs=6), tmp_path)
    first, last = reports[0], reports[-1]
    assert {"eval_loss", "eval_accuracy", "eval_precision", "eval_recall", "eval_f1", "eval_f1_POS",
            "eval_f1_NEG"} <= set(last)
    assert last["eval_loss"] < first["eval_loss"] and last["train_loss"] < first["train_loss"]
    # observed: entity F1 0.0 after the first epoch, 0.70 after the sixth (B vs I of "very good" needs context)
    assert last["eval_f1"] > 0.6 and last["eval_f1"] > first["eval_f1"] + 0.3, [r["eval_f1"] for r in reports]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "TOKEN_CLS"


@pytest.mark.parametrize("method", ["ia3", "prefix-tuning"])
def test_ia3_and_prefix_tuning_train_a_token_classifier(tmp_path, tiny_ner, ner_data, method):
    skip_refused_prefix_tuning(method, tiny_ner)
    reports = _reports(_settings(tiny_ner, ner_data, method=method, max_steps=12, evals_per_epoch=2), tmp_path)
    assert reports[-1]["eval_loss"] < reports[0]["eval_loss"]


def test_prompt_tuning_is_refused_with_its_reason(tiny_ner, ner_data):
    base = load_base(ModelSettings(tiny_ner, task=TASK), num_labels=len(TAGS))
    with pytest.raises(ValueError, match="prompt-tuning cannot train token-classification.*not to the per-token "
                                         "labels"):
        build_peft_config(PeftSettings("prompt-tuning", {"num_virtual_tokens": 4}), base.model, TASK)


def test_packed_lora_members_match_their_solo_runs(tmp_path, tiny_ner, ner_data):
    members = {
        "a": _settings(tiny_ner, ner_data, epochs=1, evals_per_epoch=2, max_steps=6, batch_size=8, seed=1),
        "b": replace(_settings(tiny_ner, ner_data, epochs=1, evals_per_epoch=2, max_steps=4, learning_rate=1e-2,
                               seed=2), peft=PeftSettings("lora", {"r": 2, "lora_dropout": 0.0,
                                                                   "target_modules": ["query", "key", "value"]})),
    }
    members["a"] = replace(members["a"], peft=PeftSettings("lora", {**BERT_PARAMS["lora"], "lora_dropout": 0.0}))
    solo = {key: _reports(settings, tmp_path / f"solo_{key}") for key, settings in members.items()}
    packed = packed_reports(load_base(members["a"].model, num_labels=len(TAGS)), members)
    for key in members:
        assert len(packed[key]) == len(solo[key])
        for mine, theirs in zip(packed[key], solo[key]):
            for name in ("step", "train_loss", "eval_loss", "eval_accuracy", "eval_f1", "eval_f1_POS"):
                assert mine[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), (key, name, mine, theirs)
