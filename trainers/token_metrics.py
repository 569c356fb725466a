"""Token classification metrics from summed counts, so that ranks can add theirs up before anything is divided.

Per eval round: eval_loss (mean cross-entropy over the labelled positions: each word's first sub-token),
eval_accuracy (share of those positions whose argmax is the word's tag), and entity-level scores as seqeval
defines them (CoNLL's conlleval): eval_precision, eval_recall, eval_f1 (micro over entity types) and
eval_f1_<TYPE> for each type that occurs in the eval rows. Entities are extracted by seqeval's own
`get_entities`, row by row; an entity counts as found when its type, start and end all match. True positives,
false positives and false negatives per type add up over rows (no entity crosses a row), hence over ranks.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

import torch
import torch.nn.functional as F

from trainers.data import IGNORE_INDEX

Entity = Tuple[str, int, int]   # (type, first word, last word), as seqeval's get_entities gives them


def entity_types(tag_names: Sequence[str]) -> List[str]:
    """The sorted entity types of a BIO tag set (B-PER, I-PER, O -> [PER])."""
    return sorted({tag[2:] for tag in tag_names if tag != "O"})


def entities(tags: Sequence[str]) -> Set[Entity]:
    """The entities of one row's tags, by seqeval's definition (an I- after O or another type starts one)."""
    from seqeval.metrics.sequence_labeling import get_entities

    return set(get_entities(list(tags)))


def entity_counts(gold: Sequence[str], predicted: Sequence[str],
                  types: Sequence[str]) -> Dict[str, Tuple[int, int, int]]:
    """type -> (true positives, false positives, false negatives) of one row."""
    gold_entities, predicted_entities = entities(gold), entities(predicted)
    counts = {}
    for kind in types:
        gold_of = {entity for entity in gold_entities if entity[0] == kind}
        predicted_of = {entity for entity in predicted_entities if entity[0] == kind}
        found = len(gold_of & predicted_of)
        counts[kind] = (found, len(predicted_of) - found, len(gold_of) - found)
    return counts


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0   # seqeval's zero_division: 0


def scores(tp: float, fp: float, fn: float) -> Tuple[float, float, float]:
    """(precision, recall, F1) as seqeval computes them (F1 from precision and recall, 0 where undefined)."""
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return precision, recall, _ratio(2 * precision * recall, precision + recall)


class TokenCounts:
    """Sums over the eval rows seen by this rank; `as_list` / `from_list` carry them through an all_reduce."""

    def __init__(self, tag_names: Sequence[str] = ()):
        self.tag_names: Tuple[str, ...] = tuple(tag_names)
        self.types = entity_types(self.tag_names)
        self.loss_sum = self.labelled = self.correct = 0.0
        self.true_pos = [0.0] * len(self.types)
        self.false_pos = [0.0] * len(self.types)
        self.false_neg = [0.0] * len(self.types)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, tag_names: Sequence[str]) -> None:
        """One eval batch: logits [rows, positions, tags], labels [rows, positions] (IGNORE_INDEX off the words'
        first sub-tokens), keep [rows] (0 for the rows that only even out the ranks' shards)."""
        if not self.tag_names:
            self.__init__(tag_names)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
        counted = (labels != IGNORE_INDEX).float() * keep[:, None]
        predicted = logits.argmax(dim=-1)
        self.loss_sum += float((losses * counted).sum())
        self.labelled += float(counted.sum())
        self.correct += float(((predicted == labels).float() * counted).sum())
        for row in range(labels.shape[0]):
            if not float(keep[row]):
                continue
            words = labels[row] != IGNORE_INDEX
            gold = [self.tag_names[index] for index in labels[row][words].tolist()]
            guessed = [self.tag_names[index] for index in predicted[row][words].tolist()]
            for position, (tp, fp, fn) in enumerate(entity_counts(gold, guessed, self.types).values()):
                self.true_pos[position] += tp
                self.false_pos[position] += fp
                self.false_neg[position] += fn

    def as_list(self) -> List[float]:
        return [self.loss_sum, self.labelled, self.correct, *self.true_pos, *self.false_pos, *self.false_neg]

    def from_list(self, values: Sequence[float]) -> "TokenCounts":
        """A TokenCounts of the same tags holding `values` (as `as_list` orders them)."""
        total, n = TokenCounts(self.tag_names), len(self.types)
        total.loss_sum, total.labelled, total.correct = values[:3]
        total.true_pos, total.false_pos = list(values[3:3 + n]), list(values[3 + n:3 + 2 * n])
        total.false_neg = list(values[3 + 2 * n:3 + 3 * n])
        return total

    def metrics(self) -> Dict[str, float]:
        precision, recall, f1 = scores(sum(self.true_pos), sum(self.false_pos), sum(self.false_neg))
        result = {"eval_loss": _ratio(self.loss_sum, self.labelled) if self.labelled else float("nan"),
                  "eval_accuracy": _ratio(self.correct, self.labelled) if self.labelled else float("nan"),
                  "eval_precision": precision, "eval_recall": recall,
                  "eval_f1": f1}
        for kind, found, extra, missed in zip(self.types, self.true_pos, self.false_pos, self.false_neg):
            if found + missed:   # types of the eval rows: the same keys every round of every trial
                result[f"eval_f1_{kind}"] = scores(found, extra, missed)[2]
        return result
