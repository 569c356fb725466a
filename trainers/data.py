"""Rows -> tokenized batches for one trial: the eval split, the label mapping, sharding across ranks.

Everything that must not change between trials of one search is derived deterministically from the
DataSettings alone: the held-out split (split_seed) and the label mapping (sorted labels of train).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from trainers.distributed import DistContext
from trainers.records import DataError, read_records
from trainers.settings import DataSettings

CLASSIFICATION = "sequence-classification"
CAUSAL_LM = "causal-lm"
IGNORE_INDEX = -100          # what torch's cross-entropy skips: padding and prompt positions
KEEP = "keep"                # eval batches only: 0 for rows duplicated to even out the ranks' shards


def split_records(data: DataSettings) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(train rows, eval rows): data.eval if given, else a split of train seeded by data.split_seed."""
    train = read_records(data.train, split="train")
    if data.eval:
        return train, read_records(data.eval, split="validation")
    if not 0.0 < data.eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in (0, 1) when data.eval is not given, got {data.eval_fraction}")
    order = list(range(len(train)))
    random.Random(data.split_seed).shuffle(order)
    n_eval = max(1, round(len(train) * data.eval_fraction))
    if n_eval >= len(train):
        raise DataError(f"{data.train}: {len(train)} rows are too few to hold out {data.eval_fraction:.0%} for eval")
    held_out = set(order[:n_eval])
    return ([row for i, row in enumerate(train) if i not in held_out],
            [row for i, row in enumerate(train) if i in held_out])


def label_mapping(train_rows: Sequence[Dict[str, Any]], label_field: str) -> Dict[str, int]:
    """Label (as a string) -> id, from the sorted unique labels of train: identical in every trial."""
    labels = set()
    for index, row in enumerate(train_rows):
        if row.get(label_field) is None:
            raise DataError(f"train row {index}: no {label_field!r} field (data.label_field)")
        labels.add(str(row[label_field]))
    if len(labels) < 2:
        raise DataError(f"train holds {len(labels)} distinct label(s) in {label_field!r}; classification needs >= 2")
    return {label: index for index, label in enumerate(sorted(labels))}


def tokenize_rows(rows: Sequence[Dict[str, Any]], tokenizer, task: str, data: DataSettings,
                  labels: Optional[Dict[str, int]] = None, source: str = "train") -> List[Dict[str, List[int]]]:
    """Each row -> {input_ids, attention_mask[, label]} truncated to data.max_length, not padded yet."""
    texts = []
    for index, row in enumerate(rows):
        text = row.get(data.text_field)
        if not isinstance(text, str):
            raise DataError(f"{source} row {index}: field {data.text_field!r} (data.text_field) is missing or not text")
        texts.append(text)
    encoded = tokenizer(texts, truncation=True, max_length=data.max_length)
    examples = []
    for index, (ids, mask) in enumerate(zip(encoded["input_ids"], encoded["attention_mask"])):
        example = {"input_ids": list(ids), "attention_mask": list(mask)}
        if task == CLASSIFICATION:
            label = str(rows[index].get(data.label_field))
            if label not in labels:
                raise DataError(f"{source} row {index}: label {label!r} does not occur in train "
                                f"(train labels: {', '.join(labels)})")
            example["label"] = labels[label]
        elif tokenizer.eos_token_id is not None and ids and ids[-1] != tokenizer.eos_token_id \
                and len(ids) < data.max_length:
            # End each text with EOS so the model also learns where a text stops.
            example["input_ids"].append(tokenizer.eos_token_id)
            example["attention_mask"].append(1)
        examples.append(example)
    return examples


class _ListDataset(Dataset):
    def __init__(self, examples: List[Dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.examples[index]


class PadCollator:
    """Pads a batch to its longest row (dynamic padding), right-side.

    Causal LM labels are the input ids with padding set to IGNORE_INDEX; they come from the attention
    mask, not the pad id, because the pad token may be the EOS token, which must still be learnt.
    """

    def __init__(self, pad_token_id: int, task: str):
        self.pad_token_id = pad_token_id
        self.task = task

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.task == CLASSIFICATION:
            batch["labels"] = torch.tensor([example["label"] for example in examples], dtype=torch.long)
        else:
            batch["labels"] = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        if KEEP in examples[0]:
            batch[KEEP] = torch.tensor([example[KEEP] for example in examples], dtype=torch.float32)
        return batch


@dataclass
class TrialData:
    train: DataLoader                    # this rank's shard; the same number of batches on every rank
    eval: DataLoader                     # this rank's shard, evened out with KEEP=0 duplicates
    labels: Optional[Dict[str, int]]     # classification: label -> id
    train_size: int                      # rows in the whole train split (all ranks)
    eval_size: int
    seed: int = 0                        # the shuffling seed (TrainingSettings.seed)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the train order for `epoch` (deterministic from the seed)."""
        sampler = self.train.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
            sampler.generator.manual_seed(self.seed + epoch)


@dataclass
class TrialRows:
    """The raw rows of a trial and its label mapping, before tokenization (no tokenizer needed)."""
    train: List[Dict[str, Any]]
    eval: List[Dict[str, Any]]
    labels: Optional[Dict[str, int]]     # classification only


def read_trial_rows(data: DataSettings, task: str) -> TrialRows:
    train_rows, eval_rows = split_records(data)
    if not train_rows or not eval_rows:
        raise DataError(f"{data.train}: the train and eval splits must both hold rows "
                        f"(got {len(train_rows)} train, {len(eval_rows)} eval)")
    labels = label_mapping(train_rows, data.label_field) if task == CLASSIFICATION else None
    return TrialRows(train=train_rows, eval=eval_rows, labels=labels)


def build_data(rows: TrialRows, data: DataSettings, tokenizer, task: str, batch_size: int, seed: int,
               ctx: DistContext) -> TrialData:
    """Tokenized train / eval loaders for this rank."""
    train_examples = tokenize_rows(rows.train, tokenizer, task, data, rows.labels, source="train")
    eval_examples = tokenize_rows(rows.eval, tokenizer, task, data, rows.labels, source="eval")
    collate = PadCollator(tokenizer.pad_token_id, task)

    if ctx.world_size > 1:
        if len(train_examples) < ctx.world_size:
            raise DataError(f"{data.train}: {len(train_examples)} train rows cannot be shared by {ctx.world_size} workers")
        # drop_last: every rank gets len // world_size rows, so no rank runs out of batches first and hangs
        # the others in a collective.
        sampler = DistributedSampler(train_examples, num_replicas=ctx.world_size, rank=ctx.rank,
                                     shuffle=True, seed=seed, drop_last=True)
    else:
        sampler = RandomSampler(train_examples, generator=torch.Generator().manual_seed(seed))
    train_loader = DataLoader(_ListDataset(train_examples), batch_size=batch_size, sampler=sampler,
                              collate_fn=collate)
    eval_loader = DataLoader(_ListDataset(eval_shard(eval_examples, ctx.rank, ctx.world_size)),
                             batch_size=batch_size, shuffle=False, collate_fn=collate)
    return TrialData(train=train_loader, eval=eval_loader, labels=rows.labels,
                     train_size=len(train_examples), eval_size=len(eval_examples), seed=seed)


def eval_shard(examples: List[Dict[str, Any]], rank: int, world_size: int) -> List[Dict[str, Any]]:
    """Rows rank, rank + world_size, ...; shards shorter than the longest get a copy of a row with KEEP=0.

    Every rank then runs the same number of forward passes (ZeRO-3 gathers parameters collectively in
    each one), and the metrics count every row exactly once.
    """
    shard = [{**example, KEEP: 1.0} for example in examples[rank::world_size]]
    longest = -(-len(examples) // world_size)
    while len(shard) < longest:
        shard.append({**examples[0], KEEP: 0.0})
    return shard


def batch_stream(trial_data: TrialData) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
    """(epoch, batch) forever: the train loader epoch after epoch, reshuffled each epoch."""
    epoch = 0
    while True:
        trial_data.set_epoch(epoch)
        for batch in trial_data.train:
            yield epoch, batch
        epoch += 1
