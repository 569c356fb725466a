import json

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from trainers.tiny_models import (NEGATIVE_WORDS, POSITIVE_WORDS, build_tiny_causal_lm, build_tiny_classifier,
                                  make_learnable_classification_data, make_learnable_lm_data)


def test_classifier_and_tokenizer_load_offline(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    encoded = tokenizer(["good movie", "the plot was bad and ugly"], padding=True, return_tensors="pt")
    assert encoded["input_ids"][0, 0] == tokenizer.cls_token_id and tokenizer.unk_token_id not in encoded["input_ids"]
    assert model(**encoded).logits.shape == (2, 2)
    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    assert {"query", "value"} <= names
    for token in ("pad_token", "unk_token", "cls_token", "sep_token", "eos_token"):
        assert getattr(tokenizer, token) is not None


def test_causal_lms_load_offline(tiny_llama, tiny_gpt2):
    for path in (tiny_llama, tiny_gpt2):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        encoded = tokenizer(["one two three"], return_tensors="pt")
        assert "token_type_ids" not in encoded
        assert model(**encoded).logits.shape == (1, 3, tokenizer.vocab_size)


def test_tiny_tokenizer_alone():
    from trainers.tiny_models import build_tiny_tokenizer

    causal, bert = build_tiny_tokenizer(causal=True), build_tiny_tokenizer()
    assert causal("one two")["input_ids"] == bert("one two")["input_ids"][1:-1]
    assert "token_type_ids" not in causal("one") and "token_type_ids" in bert("one")


def test_same_seed_same_weights(tmp_path):
    first = build_tiny_causal_lm(str(tmp_path / "a"), seed=3)
    second = build_tiny_causal_lm(str(tmp_path / "b"), seed=3)
    other = build_tiny_classifier(str(tmp_path / "c"), seed=3)
    again = build_tiny_classifier(str(tmp_path / "d"), seed=3)
    for left, right, cls in ((first, second, AutoModelForCausalLM), (other, again, AutoModelForSequenceClassification)):
        a, b = cls.from_pretrained(left).state_dict(), cls.from_pretrained(right).state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_learnable_data(tmp_path):
    path = make_learnable_classification_data(str(tmp_path / "c.jsonl"), n=50, seed=1)
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 50 and {row["label"] for row in rows} == {"0", "1"}
    for row in rows:
        words = set(row["text"].split())
        assert bool(words & set(POSITIVE_WORDS)) == (row["label"] == "1")
        assert bool(words & set(NEGATIVE_WORDS)) == (row["label"] == "0")
    assert path == make_learnable_classification_data(str(tmp_path / "c2.jsonl"), n=50, seed=1).replace("c2", "c")
    assert open(path).read() == open(tmp_path / "c2.jsonl").read()
    lm_rows = [json.loads(line) for line in open(make_learnable_lm_data(str(tmp_path / "l.jsonl"), n=5))]
    assert len(lm_rows) == 5 and all(row["text"] for row in lm_rows)
