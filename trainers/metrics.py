"""Task metrics from summed counts, so that ranks can add theirs up before anything is divided.

classification: eval_loss (mean cross-entropy per row), eval_accuracy, eval_f1 (macro over labels);
causal-lm: eval_loss (mean cross-entropy per predicted token), eval_perplexity = exp(eval_loss),
eval_accuracy (share of predicted tokens whose argmax is the next token);
token-classification: trainers/token_metrics.py (entity-level precision, recall, F1, per-type F1).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from trainers.data import CAUSAL_LM, IGNORE_INDEX, KEEP, TOKEN_CLASSIFICATION
from trainers.distributed import all_reduce
from trainers.token_metrics import TokenCounts


class EvalCounts:
    """Sums over the eval rows seen by this rank: loss, loss items, and per-label tp/fp/fn."""

    def __init__(self, task: str, num_labels: Optional[int] = None):
        self.task = task
        self.num_labels = num_labels or 0
        self.loss_sum = 0.0
        self.loss_items = 0.0
        self.correct = 0.0
        self.rows = 0.0
        self.true_pos = [0.0] * self.num_labels
        self.false_pos = [0.0] * self.num_labels
        self.false_neg = [0.0] * self.num_labels
        self.tokens = TokenCounts() if task == TOKEN_CLASSIFICATION else None   # entity counts, per type

    def add(self, logits: torch.Tensor, batch: Dict[str, torch.Tensor]) -> None:
        keep = batch[KEEP].to(logits.device) if KEEP in batch else torch.ones(logits.shape[0], device=logits.device)
        if self.tokens is not None:
            from trainers.token_data import TAG_NAMES

            self.tokens.add(logits.float(), batch["labels"].to(logits.device), keep, batch[TAG_NAMES])
        elif self.task == CAUSAL_LM:
            self._add_lm(logits.float(), batch["labels"].to(logits.device), keep)
        else:
            self._add_classification(logits.float(), batch["labels"].to(logits.device), keep)

    def _add_lm(self, logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> None:
        # Prompt tuning prepends virtual-token positions to the logits; the text's are the last ones.
        logits = logits[:, -labels.shape[1]:, :]
        shifted_logits, targets = logits[:, :-1, :], labels[:, 1:]
        losses = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
        counted = (targets != IGNORE_INDEX).float() * keep[:, None]
        self.loss_sum += float((losses * counted).sum())
        self.loss_items += float(counted.sum())
        self.correct += float(((shifted_logits.argmax(dim=-1) == targets).float() * counted).sum())

    def _add_classification(self, logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> None:
        losses = F.cross_entropy(logits, labels, reduction="none")
        self.loss_sum += float((losses * keep).sum())
        self.loss_items += float(keep.sum())
        predicted = logits.argmax(dim=-1)
        self.correct += float(((predicted == labels).float() * keep).sum())
        self.rows += float(keep.sum())
        for label in range(self.num_labels):
            is_label, says_label = labels == label, predicted == label
            self.true_pos[label] += float(((is_label & says_label).float() * keep).sum())
            self.false_pos[label] += float(((~is_label & says_label).float() * keep).sum())
            self.false_neg[label] += float(((is_label & ~says_label).float() * keep).sum())

    def _as_list(self) -> List[float]:
        return [self.loss_sum, self.loss_items, self.correct, self.rows,
                *self.true_pos, *self.false_pos, *self.false_neg, *(self.tokens.as_list() if self.tokens else [])]

    def reduced(self) -> "EvalCounts":
        """The counts summed over all ranks (the identity without torch.distributed)."""
        values = all_reduce(self._as_list(), op="sum")
        total = EvalCounts(self.task, self.num_labels)
        total.loss_sum, total.loss_items, total.correct, total.rows = values[:4]
        n = self.num_labels
        total.true_pos, total.false_pos = values[4:4 + n], values[4 + n:4 + 2 * n]
        total.false_neg = values[4 + 2 * n:4 + 3 * n]
        if self.tokens is not None:
            total.tokens = self.tokens.from_list(values[4 + 3 * n:])
        return total

    def metrics(self) -> Dict[str, float]:
        if self.tokens is not None:
            return self.tokens.metrics()
        loss = self.loss_sum / self.loss_items if self.loss_items else float("nan")
        if self.task == CAUSAL_LM:
            # exp overflows past ~709; a perplexity that large means "diverged" anyway
            return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)) if loss == loss else loss,
                    "eval_accuracy": self.correct / self.loss_items if self.loss_items else float("nan")}
        return {"eval_loss": loss, "eval_accuracy": self.correct / self.rows if self.rows else float("nan"),
                "eval_f1": macro_f1(self.true_pos, self.false_pos, self.false_neg)}


def macro_f1(true_pos: List[float], false_pos: List[float], false_neg: List[float]) -> float:
    """Mean F1 over the labels that occur in the eval rows or the predictions (as sklearn's macro F1)."""
    scores = []
    for tp, fp, fn in zip(true_pos, false_pos, false_neg):
        denominator = 2 * tp + fp + fn
        if denominator:
            scores.append(2 * tp / denominator)
    return sum(scores) / len(scores) if scores else float("nan")
