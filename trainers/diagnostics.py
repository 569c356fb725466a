"""Per-trial diagnostics for known fine-tuning failure modes, reported as `diag_*` metrics.

- Rank collapse (LoRA): the effective rank of each adapter's update B·A. A rank-64 adapter whose
  update spans two directions trains as rank 2 and wastes memory; the ratio to r shows it.
- Overfitting gap: eval loss minus train loss of the last round.
- Train/eval overlap: eval rows that are exact or near copies of train rows inflate every eval
  metric; the search checks it when a spec is validated (search/spec/checks.py).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import numpy as np
import torch

EFFECTIVE_RANK = "diag_effective_rank"              # mean over LoRA modules
EFFECTIVE_RANK_RATIO = "diag_effective_rank_ratio"  # mean over LoRA modules of effective rank / r
OVERFIT_GAP = "diag_overfit_gap"
RANK_KEYS = (EFFECTIVE_RANK, EFFECTIVE_RANK_RATIO)

# Near duplicates as in Lee et al. 2022 ("Deduplicating Training Data Makes Language Models Better"):
# word 5-gram sets with Jaccard >= 0.8 catch copies with a changed word or two, not mere topic overlap.
SHINGLE_WORDS = 5
NEAR_JACCARD = 0.8
_EPSILON = 1e-9   # float slack in threshold comparisons: 0.8 * 15 = 12.000000000000002


# --- rank collapse -------------------------------------------------------------------------------
def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the Shannon entropy of the singular values normalised to sum 1 (Roy & Vetterli, 2007).

    1 for a single direction, k for k equal singular values, in between for uneven ones; 0 for a
    zero matrix (an untrained LoRA update, whose B starts at zero, has no rank at all).
    """
    values = singular_values.detach().double().clamp_min(0)
    total = values.sum()
    if total <= 0:
        return 0.0
    shares = values / total
    shares = shares[shares > 0]
    return float(torch.exp(-(shares * shares.log()).sum()))


def low_rank_singular_values(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of scale·B·A (B: d_out x r, A: r x d_in) without forming the d_out x d_in product.

    With B = Q_b R_b and Aᵀ = Q_a R_a (thin QR), B·A = Q_b (R_b R_aᵀ) Q_aᵀ, and Q_b, Q_a have
    orthonormal columns, so B·A has the singular values of the r x r core R_b R_aᵀ: O((d_out + d_in) r²).
    """
    b, a = b.detach().double(), a.detach().double()
    r_b = torch.linalg.qr(b.reshape(b.shape[0], -1), mode="r").R
    r_a = torch.linalg.qr(a.reshape(a.shape[0], -1).T, mode="r").R
    return torch.linalg.svdvals(r_b @ r_a.T) * abs(float(scale))


@dataclass(frozen=True)
class LoraFactors:
    module: str
    b: torch.Tensor         # d_out x r (conv: d_out x r x 1 x 1)
    a: torch.Tensor         # r x d_in (conv: r x d_in x k x k)
    scale: float            # PEFT's scaling: lora_alpha / r (or / sqrt(r) with rsLoRA)
    r: int


def lora_factors(model: torch.nn.Module) -> Iterator[LoraFactors]:
    """B and A of every LoRA adapter in `model` (linear, conv and embedding layers)."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A:
            yield LoraFactors(name, module.lora_B[adapter].weight, module.lora_A[adapter].weight,
                              module.scaling[adapter], module.r[adapter])
        for adapter in module.lora_embedding_A:   # embeddings keep (r x vocab) A and (dim x r) B as parameters
            yield LoraFactors(name, module.lora_embedding_B[adapter], module.lora_embedding_A[adapter],
                              module.scaling[adapter], module.r[adapter])


def has_lora(model: torch.nn.Module) -> bool:
    """Whether `model` holds LoRA adapters: decided from the module tree, so the same on every rank."""
    return next(lora_factors(model), None) is not None


def rank_figures(model: torch.nn.Module) -> Dict[str, float]:
    """diag_effective_rank and diag_effective_rank_ratio, means over the LoRA modules; {} without LoRA.

    Under ZeRO-3 call it inside the engine's gathered_params(): partitioned weights are empty outside.
    """
    ranks, ratios = [], []
    for factors in lora_factors(model):
        rank = effective_rank(low_rank_singular_values(factors.b, factors.a, factors.scale))
        ranks.append(rank)
        ratios.append(rank / factors.r)
    if not ranks:
        return {}
    return {EFFECTIVE_RANK: sum(ranks) / len(ranks), EFFECTIVE_RANK_RATIO: sum(ratios) / len(ratios)}


# --- overfitting ---------------------------------------------------------------------------------
def overfit_gap(metrics: Mapping[str, Any]) -> Dict[str, float]:
    """eval_loss - train_loss of one round. train_loss is the mean over the round's micro-batches,
    measured while the weights still moved and with dropout on, so a small negative gap is normal;
    a large positive one means the adapter fits train rows it does not generalise from."""
    return {OVERFIT_GAP: float(metrics["eval_loss"]) - float(metrics["train_loss"])}


# --- train/eval overlap --------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """Casefolded, whitespace runs collapsed to one space: what counts as 'the same text'."""
    return " ".join(text.casefold().split())


@dataclass(frozen=True)
class Overlap:
    """Eval rows (0-based indices) that also appear among the train rows."""
    eval_rows: int
    exact: Tuple[int, ...]    # same normalised text as some train row
    near: Tuple[int, ...]     # not exact, but word 5-gram Jaccard >= NEAR_JACCARD with some train row


def text_overlap(train_texts: Sequence[str], eval_texts: Sequence[str], threshold: float = NEAR_JACCARD) -> Overlap:
    """Exact and near duplicates of train texts among the eval texts, in near-linear time."""
    train = {normalize_text(text) for text in train_texts}
    exact, rest = [], []
    for index, text in enumerate(eval_texts):
        normalized = normalize_text(text)
        (exact if normalized in train else rest).append((index, normalized))
    found = near_duplicates(sorted(train), [text for _index, text in rest], threshold)
    return Overlap(len(eval_texts), tuple(index for index, _text in exact),
                   tuple(rest[position][0] for position in found))


@dataclass
class ShingleTable:
    """Every row's set of word 5-gram hashes, flattened: row r holds hashes[starts[r]:starts[r + 1]]."""
    hashes: np.ndarray      # uint64, sorted within each row, no repeats within a row
    rows: np.ndarray        # the row of each entry
    starts: np.ndarray      # len(texts) + 1 offsets

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.starts)

    def row(self, number: int) -> np.ndarray:
        return self.hashes[self.starts[number]:self.starts[number + 1]]


def shingle_table(texts: Sequence[str]) -> ShingleTable:
    """Word 5-gram hashes of normalised texts, computed with numpy over all rows at once.

    A text of fewer than 5 words is one shingle: its words padded with a separator no word equals,
    so it only matches itself. Hashing is polynomial in word ids (mod 2^64): collisions of two different
    5-grams are as rare as any 64-bit hash's, which a duplicate count can ignore.
    """
    # One split and one C-level map over all rows: each row is followed by SHINGLE_WORDS - 1 separator
    # words (id 0), which also pad a short row to one whole shingle.
    gap = " " + " ".join([_SEPARATOR] * (SHINGLE_WORDS - 1)) + " "
    joined = gap.join(texts) + gap[:-1]
    vocabulary = {_SEPARATOR: 0}
    words = np.fromiter(map(vocabulary.setdefault, joined.split(" "), itertools.count(1)), dtype=np.uint64)
    separators = np.flatnonzero(words == 0)[::SHINGLE_WORDS - 1]
    row_starts = np.concatenate(([0], separators[:-1] + SHINGLE_WORDS - 1))
    lengths = separators - row_starts
    windows = np.maximum(lengths - SHINGLE_WORDS + 1, 1)      # shingles per row (with repeats)
    rows = np.repeat(np.arange(len(texts)), windows)
    first = np.repeat(row_starts, windows) + _ranks_within(windows)
    hashes = np.zeros(len(first), dtype=np.uint64)
    with np.errstate(over="ignore"):                          # wrapping around 2^64 is the point
        for offset in range(SHINGLE_WORDS):
            hashes = hashes * _MULTIPLIER + words[first + offset]
    order = np.lexsort((hashes, rows))
    hashes, rows = hashes[order], rows[order]
    fresh = np.ones(len(hashes), dtype=bool)
    fresh[1:] = (hashes[1:] != hashes[:-1]) | (rows[1:] != rows[:-1])
    hashes, rows = hashes[fresh], rows[fresh]
    starts = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=len(texts)))))
    return ShingleTable(hashes, rows, starts)


_SEPARATOR = "\x1e"   # str.split() counts it as whitespace, so no normalised text holds it
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)   # odd 64-bit constant (the golden ratio's): mixes word ids


def _ranks_within(sizes: np.ndarray) -> np.ndarray:
    """0, 1, ..., size - 1 for each group of `sizes` consecutive entries."""
    return np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)


def near_duplicates(train: Sequence[str], queries: Sequence[str], threshold: float) -> List[int]:
    """Positions of the queries with a train text of shingle Jaccard >= threshold.

    Prefix filtering (Bayardo et al. 2007, "Scaling up all pairs similarity search"): with shingles in
    one global order (rarest first), two sets of Jaccard >= t share a shingle among the first
    |s| - ceil(t·|s|) + 1 of each. So only train rows that share one of a query's few rarest shingles
    are compared, and the answer is exact (no MinHash misses).
    """
    if not train or not queries:
        return []
    table = shingle_table([*train, *queries])
    sizes = table.sizes
    _unique, inverse, counts = np.unique(table.hashes, return_inverse=True, return_counts=True)
    frequency = counts[inverse].astype(np.int64)
    # by row, then rarest first; a stable sort keeps the table's hash order among equally rare shingles
    order = np.argsort(table.rows * (int(frequency.max()) + 1) + frequency, kind="stable")
    prefix_lengths = sizes - np.ceil(threshold * sizes - _EPSILON).astype(np.int64) + 1
    in_prefix = _ranks_within(sizes) < np.repeat(prefix_lengths, sizes)
    prefix_hashes, prefix_rows = table.hashes[order][in_prefix], table.rows[order][in_prefix]
    from_train = prefix_rows < len(train)
    index_order = np.argsort(prefix_hashes[from_train], kind="stable")
    index_hashes, index_rows = prefix_hashes[from_train][index_order], prefix_rows[from_train][index_order]
    probe_hashes, probe_rows = prefix_hashes[~from_train], prefix_rows[~from_train]
    lows = np.searchsorted(index_hashes, probe_hashes, side="left")
    highs = np.searchsorted(index_hashes, probe_hashes, side="right")
    found, checked = set(), set()
    for row, low, high in zip(probe_rows.tolist(), lows.tolist(), highs.tolist()):
        if row in found:
            continue
        for candidate in index_rows[low:high].tolist():
            if (row, candidate) in checked:
                continue
            checked.add((row, candidate))
            if _similar(table, row, candidate, threshold):
                found.add(row)
                break
    return sorted(row - len(train) for row in found)


def _similar(table: ShingleTable, first: int, second: int, threshold: float) -> bool:
    one, other = table.row(first), table.row(second)
    # Jaccard <= min/max of the sizes: skip the intersection when the sizes alone rule it out
    if min(len(one), len(other)) < threshold * max(len(one), len(other)) - _EPSILON:
        return False
    shared = len(np.intersect1d(one, other, assume_unique=True))
    return shared >= threshold * (len(one) + len(other) - shared) - _EPSILON
