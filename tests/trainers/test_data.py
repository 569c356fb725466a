import json

import pytest
import torch
from transformers import AutoTokenizer

from trainers.data import (CAUSAL_LM, CLASSIFICATION, IGNORE_INDEX, KEEP, PadCollator, build_data, eval_shard,
                           label_mapping, read_trial_rows, split_records, tokenize_rows)
from trainers.distributed import DistContext
from trainers.records import DataError
from trainers.settings import DataSettings


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _ctx(rank=0, world_size=1):
    return DistContext(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))


def test_split_is_seeded_disjoint_and_complete(cls_data):
    settings = DataSettings(cls_data, eval_fraction=0.25, split_seed=7)
    train, held_out = split_records(settings)
    again_train, again_eval = split_records(settings)
    assert train == again_train and held_out == again_eval
    assert len(held_out) == 60 and len(train) == 180
    other = split_records(DataSettings(cls_data, eval_fraction=0.25, split_seed=8))[1]
    assert other != held_out


def test_eval_file_is_used_when_given(tmp_path, cls_data):
    eval_path = _write(tmp_path / "eval.jsonl", [{"text": "good", "label": "1"}, {"text": "bad", "label": "0"}])
    train, held_out = split_records(DataSettings(cls_data, eval=eval_path))
    assert len(train) == 240 and len(held_out) == 2


def test_label_mapping_is_sorted_strings_of_train():
    rows = [{"label": 2}, {"label": "10"}, {"label": 1}, {"label": 2}]
    assert label_mapping(rows, "label") == {"1": 0, "10": 1, "2": 2}
    with pytest.raises(DataError, match="row 0: no 'y' field"):
        label_mapping([{"label": 1}], "y")


def test_eval_label_missing_from_train_is_an_error(tmp_path, tiny_bert):
    train = _write(tmp_path / "t.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}] * 3)
    held = _write(tmp_path / "e.jsonl", [{"text": "fine", "label": "neutral"}])
    rows = read_trial_rows(DataSettings(train, eval=held), CLASSIFICATION)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    with pytest.raises(DataError, match="eval row 0: label 'neutral' does not occur in train"):
        tokenize_rows(rows.eval, tokenizer, CLASSIFICATION, DataSettings(train), rows.labels, source="eval")


def test_truncation_and_causal_labels(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    settings = DataSettings("unused.jsonl", max_length=4)
    examples = tokenize_rows([{"text": "one two three four five six"}, {"text": "one"}], tokenizer, CAUSAL_LM, settings)
    assert len(examples[0]["input_ids"]) == 4
    assert examples[1]["input_ids"][-1] == tokenizer.eos_token_id   # EOS appended where it fits
    batch = PadCollator(tokenizer.pad_token_id, CAUSAL_LM)(examples)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["labels"][1].tolist() == examples[1]["input_ids"] + [IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0]


def test_eval_shards_even_out_and_count_each_row_once():
    examples = [{"input_ids": [i], "attention_mask": [1]} for i in range(7)]
    shards = [eval_shard(examples, rank, 3) for rank in range(3)]
    assert [len(shard) for shard in shards] == [3, 3, 3]
    kept = sorted(row["input_ids"][0] for shard in shards for row in shard if row[KEEP] == 1.0)
    assert kept == list(range(7))


def test_train_is_sharded_disjoint_with_equal_batches(tiny_bert, cls_data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    settings = DataSettings(cls_data, max_length=32)
    rows = read_trial_rows(settings, CLASSIFICATION)
    loaders = [build_data(rows, settings, tokenizer, CLASSIFICATION, 16, seed=0, ctx=_ctx(rank, 2)) for rank in (0, 1)]
    assert len(loaders[0].train) == len(loaders[1].train)
    seen = [[tuple(ids) for batch in data.train for ids in batch["input_ids"].tolist()] for data in loaders]
    indices = [list(iter(data.train.sampler)) for data in loaders]
    assert not set(indices[0]) & set(indices[1])
    assert len(seen[0]) == len(seen[1]) == len(rows.train) // 2


def test_single_process_order_is_seeded(tiny_bert, cls_data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    settings = DataSettings(cls_data, max_length=32)
    rows = read_trial_rows(settings, CLASSIFICATION)

    def first_batch(seed, epoch=0):
        data = build_data(rows, settings, tokenizer, CLASSIFICATION, 8, seed=seed, ctx=_ctx())
        data.set_epoch(epoch)
        return next(iter(data.train))["input_ids"].tolist()

    assert first_batch(0) == first_batch(0)
    assert first_batch(0) != first_batch(1)
    assert first_batch(0, epoch=1) != first_batch(0, epoch=0)
