"""What a pack of K LoRA trials costs per step: peak memory and step time.

The analytic part knows the shapes: the frozen base's weights (by quantization), each member's adapter
with its gradient and AdamW state, the logits each member's loss keeps, and the FLOPs of a forward and
backward over the members' rows. What it cannot know is calibrated on the real base, device and batch
shape by a short probe (trainers/packing/probe.py) and fitted here:

    peak memory = weights + fixed_bytes + sum over members of
                  (16 B x adapter params  +  act_bytes x positions x layers x hidden  +  12 B x positions x logit width)
    step time   = step_s + sum over members of (member_s + FLOPs(member) / flops_per_s)

positions = rows x sequence length of a member's micro-batch. fixed_bytes: what the device holds besides
the weights (CUDA workspaces; on CPU the whole process: Python, libraries). step_s: per-step costs that
do not grow with K (the base's kernel launches, Python over its modules): the reason packing pays.
member_s: per-member costs (its optimizer step, loss, LoRA launches). No torch import: it is plain arithmetic.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

# Bytes per weight of a quantized linear layer: NF4 is 4 bits plus a float32 absmax per 64 weights (double
# quantization shrinks that further; ignored, so the estimate errs high); int8 one byte (row scales ignored).
QUANTIZED_BYTES = {"nf4": 0.5 + 4 / 64, "int8": 1.0}
# Per trainable parameter: fp32 weight + fp32 gradient + AdamW's two fp32 moments (8-bit paged AdamW: 2 B).
STATE_BYTES = {"adamw": 16, "paged_adamw_8bit": 10}
# Per logit: the model's logits, the loss' float copy and its gradient (HF's loss upcasts to fp32).
LOGIT_BYTES = 12
# Stop growing K when one more member adds less than this share of predicted tokens/s.
MIN_GAIN = 0.05
K_MAX = 16


@dataclass(frozen=True)
class BaseShape:
    """The frozen base, as far as cost goes."""
    params: int                # all weights (logical count, before quantization)
    matmul_params: int         # weights of linear layers (they set the FLOPs per token)
    quantized_params: int      # weights stored quantized (bitsandbytes' linear layers; 0 without quantization)
    hidden: int
    layers: int
    logit_width: int           # logits per position a loss keeps: the vocabulary (causal LM), 0 (classifier)
    quantization: str = "none"  # none | nf4 | int8
    dtype_bytes: int = 4       # bytes of an unquantized weight (4 fp32, 2 bf16 / fp16)
    checkpointing: bool = False  # gradient checkpointing: the forward runs twice

    def weight_bytes(self) -> float:
        quantized = self.quantized_params if self.quantization in QUANTIZED_BYTES else 0
        per_quantized = QUANTIZED_BYTES.get(self.quantization, self.dtype_bytes)
        return quantized * per_quantized + (self.params - quantized) * self.dtype_bytes


@dataclass(frozen=True)
class MemberShape:
    """One trial's share of a packed step."""
    rows: int                  # micro-batch size
    seq: int                   # tokens per row (padded width)
    trainable_params: int      # its adapter (and trained head copy)
    optimizer: str = "adamw"

    @property
    def positions(self) -> int:
        return self.rows * self.seq


def lora_params(rank: int, target_shapes: Iterable[Tuple[int, int]], head_params: int = 0) -> int:
    """Trainable parameters of a LoRA adapter: A (r x in) and B (out x r) at each target, plus a trained head."""
    return rank * sum(fan_in + fan_out for fan_in, fan_out in target_shapes) + head_params


@dataclass(frozen=True)
class Coefficients:
    """What the probe calibrates. Defaults are rough priors for an unprobed model (bf16 GPU-like)."""
    fixed_bytes: float = 0.0
    act_bytes: float = 34.0    # bytes kept for backward per position, layer and hidden unit (~34 for a bf16 block)
    flops_per_s: float = 1e13
    step_s: float = 0.0
    member_s: float = 0.0


@dataclass(frozen=True)
class CostModel:
    base: BaseShape
    coef: Coefficients = Coefficients()

    # --- the terms, each linear in what the probe fits ---------------------------------------------------
    def known_bytes(self, members: Sequence[MemberShape]) -> float:
        """Memory the shapes fix: weights, adapter states, logits."""
        return self.base.weight_bytes() + sum(
            STATE_BYTES.get(m.optimizer, STATE_BYTES["adamw"]) * m.trainable_params
            + LOGIT_BYTES * m.positions * self.base.logit_width for m in members)

    def activation_units(self, members: Sequence[MemberShape]) -> float:
        return sum(m.positions for m in members) * self.base.layers * self.base.hidden

    def flops(self, member: MemberShape) -> float:
        """Forward + backward FLOPs of one member's rows: 2N forward and 2N backward (input gradients only,
        the base is frozen; 2N more when checkpointing recomputes the forward), attention scores and values
        (12 x layers x seq x hidden per position, forward and backward), 6 per adapter parameter."""
        base = self.base
        dense = (6 if base.checkpointing else 4) * base.matmul_params
        attention = 12 * base.layers * member.seq * base.hidden
        return member.positions * (dense + attention + 6 * member.trainable_params)

    # --- predictions -------------------------------------------------------------------------------------
    def memory_bytes(self, members: Sequence[MemberShape]) -> float:
        coef = self.coef
        return self.known_bytes(members) + coef.fixed_bytes + coef.act_bytes * self.activation_units(members)

    def step_s(self, members: Sequence[MemberShape]) -> float:
        coef = self.coef
        return coef.step_s + len(members) * coef.member_s + sum(map(self.flops, members)) / coef.flops_per_s

    def tokens_per_s(self, members: Sequence[MemberShape]) -> float:
        """Token positions (padding included) trained per second."""
        return sum(m.positions for m in members) / self.step_s(members)

    # --- calibration -------------------------------------------------------------------------------------
    def fitted(self, measurements: Sequence["Measurement"]) -> "CostModel":
        """The coefficients that fit the measurements best (least squares; all but fixed_bytes >= 0).

        Memory needs two distinct pack sizes; time needs three points in which the pack size and the
        positions per member do not move together (e.g. K=1, K=2 and K=1 at half the rows), else step_s is
        still right but member_s and flops_per_s are split arbitrarily (the prediction for that member
        shape stays right; for another shape it may not)."""
        memory = [(m.peak_bytes - self.known_bytes(m.members), [1.0, self.activation_units(m.members)])
                  for m in measurements if m.peak_bytes is not None]
        fixed, act = _nonnegative_fit(memory, free=(0,)) if len(memory) >= 2 else (self.coef.fixed_bytes,
                                                                                      self.coef.act_bytes)
        timing = [(m.step_s, [1.0, float(len(m.members)), sum(map(self.flops, m.members))]) for m in measurements]
        step, member, per_flop = _nonnegative_fit(timing)
        return replace(self, coef=Coefficients(fixed_bytes=fixed, act_bytes=act, step_s=step, member_s=member,
                                               flops_per_s=1.0 / per_flop if per_flop > 0 else float("inf")))

    def to_dict(self) -> Dict[str, object]:
        return {"base": asdict(self.base), "coefficients": asdict(self.coef)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "CostModel":
        return cls(BaseShape(**data["base"]), Coefficients(**data["coefficients"]))


@dataclass(frozen=True)
class Measurement:
    """One probed pack: its members, peak memory over its steps (None where not measurable) and seconds a step."""
    members: Tuple[MemberShape, ...]
    peak_bytes: Optional[float]
    step_s: float


def _nonnegative_fit(points: Sequence[Tuple[float, List[float]]], free: Sequence[int] = ()) -> List[float]:
    """Least squares y ~ x . c with c >= 0 except at `free` indices. Columns are scaled to 1 first: they span
    ~20 orders of magnitude (1 against FLOPs)."""
    import numpy as np
    from scipy.optimize import lsq_linear

    x = np.array([features for _, features in points], dtype=float)
    y = np.array([value for value, _ in points], dtype=float)
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    lower = np.array([-np.inf if i in free else 0.0 for i in range(x.shape[1])])
    solution = lsq_linear(x / scale, y, bounds=(lower, np.inf)).x / scale
    return [float(value) for value in solution]


@dataclass(frozen=True)
class Choice:
    k: int
    reason: str                        # why not one more
    rows: List[Dict[str, float]]       # the prediction per K examined: k, memory_bytes, step_s, tokens_per_s, gain


def choose_k(model: CostModel, member: MemberShape, budget_bytes: float, k_max: int = K_MAX,
             min_gain: float = MIN_GAIN) -> Choice:
    """The largest K <= k_max whose predicted peak fits `budget_bytes` and whose last member still adds at
    least `min_gain` of tokens/s (0: any K that fits). K=1 (no packing) when even one member does not fit: that is what the
    trial would need alone anyway, and it fails with its own out-of-memory error if it does not fit."""
    rows: List[Dict[str, float]] = []
    chosen, reason = 1, f"the cap of {k_max} was reached (search.pack_max, or trials / concurrency)"
    for k in range(1, k_max + 1):
        members = [member] * k
        row = {"k": k, "memory_bytes": model.memory_bytes(members), "step_s": model.step_s(members),
               "tokens_per_s": model.tokens_per_s(members)}
        row["gain"] = row["tokens_per_s"] / rows[-1]["tokens_per_s"] - 1 if rows else None
        rows.append(row)
        if row["memory_bytes"] > budget_bytes:
            reason = (f"K={k} would need {row['memory_bytes'] / 2**20:.0f} MiB, over the budget of "
                      f"{budget_bytes / 2**20:.0f} MiB")
            break
        if k > 1 and min_gain > 0 and row["gain"] < min_gain:   # 0: no gain asked (float rounding aside)
            reason = f"K={k} would add {row['gain']:.1%} tokens/s, under the {min_gain:.0%} worth a member"
            break
        chosen = k
    return Choice(chosen, reason, rows)
