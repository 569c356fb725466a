"""Packed trials: several LoRA trials trained together on one frozen base, in one process.

Each member of a pack is one trial (a TrialSettings with its own rank, alpha, dropout, learning rate, batch
size and seed). Per optimizer step the pack concatenates one micro-batch of every member (its own rows, in
its own seeded order) and runs the frozen base once over all of them; at every LoRA target module each
member's low-rank update is added to its own rows only, and a classifier gets a per-member copy of its head.
Each member's loss is the mean over its own rows (or tokens), computed as its solo run computes it; the
losses are summed and differentiated once. Members share no trainable parameter and a transformer never
mixes rows (attention, norms and MLPs are per row), so every member gets exactly its solo gradient. Then
each member takes its own optimizer step (trainers/engine.PlainEngine: AdamW, warmup + cosine schedule,
gradient clipping, gradient accumulation), checks its own loss for divergence and, at the end of one of its
own rounds (Plan.for_trial, as solo), waits to be evaluated. Members can be removed and added between steps.

With lora_dropout = 0 a member's metrics equal its solo run's (`trainers.recipe.run_trial`, plain engine,
same settings) up to float rounding (tests/trainers/packing/test_packed.py). With dropout > 0 they agree only in
distribution: the members' dropout masks are drawn from the process' one RNG in pack order, so they cannot
be the masks a solo run draws. The adapter starts exactly as the solo run's does: it is created by PEFT
itself (apply_adapter) after seeding torch with the member's seed, on the base with the other members'
layers taken out, and its weights are taken over.

Not packed (`why_not_packable`): prompt and prefix tuning (they change the sequence every layer sees),
IA3 (it could be, a per-row scaling; not implemented), DoRA (it renormalises each trial's whole weight
W + BA), compiled blocks (every change of membership would recompile). The pack runs in one process:
no DeepSpeed, no torch.distributed group.
"""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from trainers.adapters import method_params
from trainers.data import CAUSAL_LM, TrialData, batch_stream, build_data, read_trial_rows
from trainers.deepspeed_config import precision_of
from trainers.diagnostics import overfit_gap, rank_figures
from trainers.distributed import current_context
from trainers.engine import PlainEngine
from trainers.generation import Question, base_round, generation_round, questions
from trainers.kernels import wants_autocast
from trainers.model import LoadedBase, apply_adapter, release_adapter
from trainers.recipe import ADAPTER_SUBDIR
from trainers.rounds import Losses, Plan, Plateau, eval_metrics, round_report, stop_on_plateau, write_metrics
from trainers.settings import TrialSettings
from trainers.system import adapter_mb, count_trainable

_ADAPTER = "default"   # the adapter name apply_adapter's PEFT model uses


def why_not_packable(settings: TrialSettings) -> Optional[str]:
    """None when these settings can train in a pack, else why not (one line naming the setting)."""
    method = settings.peft.method
    if method in ("prompt-tuning", "prefix-tuning"):
        return (f"peft.method={method}: its virtual tokens lengthen the sequence (or the attention keys) of "
                "every row, so its rows cannot share one forward pass with other trials' rows")
    if method != "lora":
        return f"peft.method={method}: only LoRA trials are packed (IA3 would be a per-row scaling, not implemented)"
    if method_params(settings.peft)["use_dora"]:
        return "peft.use_dora: DoRA normalises each trial's whole weight W + BA, which packed trials do not share"
    if settings.model.compile:
        return "model.compile: compiled blocks would recompile whenever the pack's members change"
    return None


def can_pack(settings: TrialSettings) -> bool:
    return why_not_packable(settings) is None


class Routing:
    """Which rows of the batch in flight belong to which member: (slot, start, stop) spans that cover the
    batch in order. One object shared by all packed modules; the pack sets it before every forward (and it
    stays set through backward, which gradient checkpointing's recomputation needs)."""

    def __init__(self):
        self.spans: List[Tuple[str, int, int]] = []

    def check(self, rows: int, where: str) -> None:
        if not self.spans or self.spans[-1][2] != rows:
            raise RuntimeError(f"{where}: got {rows} rows, the pack routed {self.spans}; packed modules need the "
                               "batch in dim 0 of their input")


class LoraPiece(nn.Module):
    """One member's LoRA at one module: PEFT's own lora_A, lora_B and dropout modules, taken over."""

    def __init__(self, lora_A: nn.Module, lora_B: nn.Module, dropout: nn.Module, scaling: float,
                 cast_before_add: bool):
        super().__init__()
        self.lora_A, self.lora_B, self.dropout = lora_A, lora_B, dropout
        self.scaling = scaling
        # bitsandbytes' LoRA layers cast the update to the result's dtype before adding it; plain ones add
        # in the adapter's dtype and cast the sum. Done as PEFT does, so that rounding matches the solo run.
        self.cast_before_add = cast_before_add

    def add_to(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """PEFT's LoRA forward for these rows: result + B(A(dropout(x))) * scaling, cast back to result's dtype."""
        dtype = result.dtype
        if not torch.is_autocast_enabled(x.device.type):
            # Under autocast the recipe turns PEFT's input cast off (trainers/kernels.enable_autocast).
            x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        if self.cast_before_add:
            return result + update.to(dtype)
        return (result + update).to(dtype)


class PackedLinear(nn.Module):
    """Stands in for a LoRA target module (an nn.Linear, GPT-2's Conv1D, a bitsandbytes linear): the frozen
    module runs once over the whole batch, then each member that targets this module adds its update to its
    own rows. Rows of members that do not target it pass through unchanged."""

    def __init__(self, base_layer: nn.Module, routing: Routing):
        super().__init__()
        self.base_layer = base_layer
        self.pieces = nn.ModuleDict()    # member slot -> LoraPiece
        self.routing = routing

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        self.routing.check(x.shape[0], "PackedLinear")
        if self._batchable(x):
            return self._batched(result, x)
        parts = []
        for slot, start, stop in self.routing.spans:
            rows = result[start:stop]
            if slot in self.pieces:
                rows = self.pieces[slot].add_to(rows, x[start:stop])
            parts.append(rows)
        # One copy of the output per module: the price of keeping the base's own output tensor untouched
        # (an in-place add on its slices would work too, with a CopySlices node per member).
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _batchable(self, x: torch.Tensor) -> bool:
        """Every member adapts this module with the same number of rows, no dropout, no LoRA bias, plain
        (not bitsandbytes) casting, one adapter dtype: then two batched matmuls do what K pairs of small
        ones would (a 1B model has 4 x 16 LoRA modules: K pairs each are K x 128 kernel launches a pass)."""
        spans = self.routing.spans
        if len(spans) < 2 or any(slot not in self.pieces for slot, _, _ in spans):
            return False
        if len({stop - start for _, start, stop in spans}) != 1:
            return False
        pieces = [self.pieces[slot] for slot, _, _ in spans]
        return all(isinstance(p.dropout, nn.Identity) and p.lora_A.bias is None and p.lora_B.bias is None
                   and not p.cast_before_add and p.lora_A.weight.dtype == pieces[0].lora_A.weight.dtype
                   for p in pieces)

    def _batched(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """result + B_k(A_k(x_k)) * scaling_k for every member k at once. Ranks are zero-padded to the
        largest: a padded column of A and row of B are zero, get zero gradients, and so stay zero (AdamW
        included), and they add exactly zero to the update."""
        pieces = [self.pieces[slot] for slot, _, _ in self.routing.spans]
        k, rank = len(pieces), max(p.lora_A.weight.shape[0] for p in pieces)
        a = torch.stack([F.pad(p.lora_A.weight, (0, 0, 0, rank - p.lora_A.weight.shape[0])) for p in pieces])
        b = torch.stack([F.pad(p.lora_B.weight, (0, rank - p.lora_B.weight.shape[1])) for p in pieces])
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        rows = x.reshape(k, -1, x.shape[-1])                                   # [K, rows x seq, in]
        update = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2))   # [K, rows x seq, out]
        scaling = torch.tensor([p.scaling for p in pieces], device=update.device, dtype=update.dtype)
        update = (update * scaling.view(k, 1, 1)).reshape(result.shape)
        return (result + update).to(result.dtype)


class PackedHead(nn.Module):
    """Stands in for a module PEFT trains a copy of (modules_to_save: a classifier's head): each member's
    own copy runs on its own rows. The frozen original is kept to be put back, never run."""

    def __init__(self, original: nn.Module, routing: Routing):
        super().__init__()
        self.original = original
        self.pieces = nn.ModuleDict()    # member slot -> that member's trained copy of the head
        self.routing = routing

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.routing.check(x.shape[0], "PackedHead")
        parts = [self.pieces[slot](x[start:stop], *args, **kwargs) for slot, start, stop in self.routing.spans]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class MemberAdapter(nn.Module):
    """A member's trainable modules, named by the base module they belong to ('.' -> '/'): what its optimizer
    and gradient clipping see, in the order of the solo run's PEFT model (LoRA layers in module order, head last)."""

    def __init__(self):
        super().__init__()
        self.lora = nn.ModuleDict()      # module path -> LoraPiece
        self.heads = nn.ModuleDict()     # module path -> trained copy of the head


def _key(path: str) -> str:
    return path.replace(".", "/")        # ModuleDict keys cannot hold dots; module paths hold no slashes


def _path(key: str) -> str:
    return key.replace("/", ".")


@dataclass
class Member:
    """One trial in a pack: its data, adapter, engine (optimizer, schedule, clipping) and where it stands."""
    key: Hashable
    settings: TrialSettings
    slot: str                            # its name inside the packed modules
    data: TrialData
    adapter: MemberAdapter
    engine: PlainEngine
    plan: Plan
    plateau: Plateau
    stream: Iterator
    trainable_params: int
    micro_batches: int = 0
    tokens: int = 0                      # non-pad tokens trained on
    losses: Losses = field(default_factory=Losses)
    rounds_done: int = 0
    awaiting_eval: bool = False          # its last step ended a round: it waits for `evaluate`
    failed: Optional[str] = None         # a TrialFailed reason (divergence)
    stopped_early: bool = False          # a plateau stop (Plateau), a finished trial
    questions: List[Question] = field(default_factory=list)   # eval rows it answers each round (generation)
    base_figures: Dict[str, Any] = field(default_factory=dict)  # the base model's answers and scores (base_*)

    @property
    def finished(self) -> bool:
        """No more steps: all its rounds are done, or a plateau stopped it (save and remove it)."""
        return self.stopped_early or self.rounds_done == len(self.plan.round_ends)

    @property
    def trains(self) -> bool:
        return not (self.finished or self.failed or self.awaiting_eval)


@dataclass
class StepResult:
    round_ends: List[Hashable]           # members whose step ended a round: evaluate them before the next step
    failed: Dict[Hashable, str]          # members that diverged in this step (they train no more): remove them
    positions: int = 0                   # rows x padded width of the step's concatenated batch (its compute)
    members: int = 0                     # members that trained in it


class Pack:
    """K LoRA trials on one lent base (trainers.model.load_base), trained in one forward/backward per step.

        pack = Pack(base)
        pack.add("t1", settings1); pack.add("t2", settings2)
        while pack.members:
            result = pack.step()
            for key in result.round_ends:
                metrics = pack.evaluate(key)          # what run_trial reports for that round
                if pack.members[key].finished:
                    pack.save(key, out_dir, metrics); pack.remove(key)
            for key in result.failed: pack.remove(key)
        pack.close()                                  # the base as it was lent, frozen

    The base is frozen (requires_grad False) while lent, as get_peft_model freezes it; `close` hands it back
    with its own modules in place and its weights untouched.
    """

    def __init__(self, base: LoadedBase, device: Optional[torch.device] = None):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # (a group of one, as Ray Train sets up for a 1-worker trial, is the same as none)
            raise ValueError("packed trials run in one process; a torch.distributed group of several is initialized")
        if base.zero3_scope is not None:
            raise ValueError("packed trials need a whole base on one device, not a ZeRO-3 partitioned one")
        self.base = base
        self.device = device or base.device
        self.routing = Routing()
        self.members: Dict[Hashable, Member] = {}
        self._packed: Dict[str, nn.Module] = {}   # module path -> PackedLinear | PackedHead standing there
        self._slots = 0
        self._was_training = base.model.training
        self._autocast = base.settings is not None and wants_autocast(base.settings, base.dtype)
        base.model.requires_grad_(False)

    # --- membership ------------------------------------------------------------------------------------
    def add(self, key: Hashable, settings: TrialSettings) -> Member:
        """A new member at step 0: its data (own batch size and seed), its adapter as its solo run starts it,
        its engine and plan. Raises ValueError for settings that cannot be packed or do not fit this base."""
        reason = why_not_packable(settings)
        if reason:
            raise ValueError(f"trial {key!r} cannot be packed: {reason}")
        if key in self.members:
            raise ValueError(f"trial {key!r} is already in the pack")
        base, task = self.base, settings.model.task
        rows = read_trial_rows(settings.data, task)
        num_labels = len(rows.labels) if rows.labels else None
        if base.task != task or base.num_labels != num_labels:
            raise ValueError(f"the pack's base is a {base.task} model with num_labels={base.num_labels}; trial "
                             f"{key!r} needs {task} with num_labels={num_labels}")
        data = build_data(rows, settings.data, base.tokenizer, task, settings.training.batch_size,
                          settings.training.seed, current_context())
        plan = Plan.for_trial(settings, len(data.train))
        plateau = Plateau.for_trial(settings)
        adapter = self._fresh_adapter(settings)
        engine = PlainEngine(adapter, settings.training, plan.total_steps, precision=precision_of(str(base.dtype)))
        slot = f"m{self._slots}"
        self._slots += 1
        for key_, piece in adapter.lora.items():
            self._packed_at(_path(key_), PackedLinear).pieces[slot] = piece
        for key_, head in adapter.heads.items():
            self._packed_at(_path(key_), PackedHead).pieces[slot] = head
        member = Member(key=key, settings=settings, slot=slot, data=data, adapter=adapter, engine=engine, plan=plan,
                        plateau=plateau, stream=batch_stream(data), trainable_params=count_trainable(adapter),
                        questions=questions(rows.eval, base.tokenizer, settings.data, rows.format, settings.generation))
        self.members[key] = member
        if settings.generation.base_answers:
            with self._autocast_context():
                member.base_figures = base_round(base.model, base.tokenizer, member.questions, settings.generation,
                                                 current_context(), adapter_off=self._taken_out())
        base.model.train()
        return member

    def remove(self, key: Hashable) -> None:
        """Take a member out (finished, stopped by the scheduler, failed): its adapter, optimizer and data are
        freed, and a module no member adapts any more gets the base's own module back."""
        member = self.members.pop(key)
        for path, packed in list(self._packed.items()):
            if member.slot in packed.pieces:
                del packed.pieces[member.slot]
            if not len(packed.pieces):
                self._put(path, _original(packed))
                del self._packed[path]
        member.engine = member.adapter = member.stream = member.data = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> LoadedBase:
        """Remove every member; the base is left with its own modules, weights untouched, frozen."""
        for key in list(self.members):
            self.remove(key)
        self.base.model.train(self._was_training)
        return self.base

    def __enter__(self) -> "Pack":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- training --------------------------------------------------------------------------------------
    def step(self) -> StepResult:
        """One micro-batch for every member that trains (not finished, failed or waiting for its eval), in one
        forward and one backward over their concatenated rows; then each member's own optimizer step."""
        training = [member for member in self.members.values() if member.trains]
        if not training:
            return StepResult([], {})
        batches = [next(member.stream)[1] for member in training]
        spans, start = [], 0
        for member, batch in zip(training, batches):
            spans.append((member.slot, start, start + batch["input_ids"].shape[0]))
            start = spans[-1][2]
        inputs = self._concatenated(batches)
        self.routing.spans = spans
        with self._autocast_context():
            logits = self.base.model(**inputs).logits
            losses = [self._loss(logits[start:stop, :batch["input_ids"].shape[1]], batch["labels"].to(self.device))
                      for (_, start, stop), batch in zip(spans, batches)]
        sum(member.engine.backward_term(loss) for member, loss in zip(training, losses)).backward()
        # One host-device round trip per step for all members (the recipe reads each loss one step late to
        # spare a solo step that wait; here it is shared by every member of the pack).
        values = torch.stack([loss.detach().float() for loss in losses]).tolist()
        result = StepResult([], {}, positions=inputs["input_ids"].numel(), members=len(training))
        for member, batch, value in zip(training, batches, values):
            reason = member.losses.add(value, member.engine.optimizer_steps + 1)
            if reason:
                member.failed = result.failed[member.key] = reason
                member.engine.optimizer.zero_grad(set_to_none=True)
                continue
            member.micro_batches += 1
            member.tokens += int(batch["attention_mask"].sum())
            if member.engine.step() and member.engine.optimizer_steps == member.plan.round_ends[member.rounds_done]:
                member.awaiting_eval = True
                result.round_ends.append(member.key)
        return result

    def _concatenated(self, batches: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """The members' micro-batches as one, right-padded to the longest. Extra padding changes no member's
        outputs: padded keys are masked out of attention and positions count from the left."""
        width = max(batch["input_ids"].shape[1] for batch in batches)
        pad_id = self.base.tokenizer.pad_token_id

        def padded(name: str, value: int) -> torch.Tensor:
            return torch.cat([F.pad(batch[name], (0, width - batch[name].shape[1]), value=value) for batch in batches])

        return {"input_ids": padded("input_ids", pad_id).to(self.device),
                "attention_mask": padded("attention_mask", 0).to(self.device)}

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A member's loss over its own rows, as its solo run's model computes it from `labels`."""
        model = self.base.model
        if self.base.task == CAUSAL_LM:
            # the model's own loss (shift, ignore -100, mean over this member's counted tokens)
            # (contiguous: a member's slice of a wider batch's logits is not, and the loss views them flat)
            return model.loss_function(logits=logits.contiguous(), labels=labels, vocab_size=model.config.vocab_size)
        # single-label classification, as transformers' classifiers compute it (mean over the rows); token
        # classification the same per position (mean over the labelled ones: IGNORE_INDEX is cross_entropy's
        # default ignore_index). reshape: a member's slice of a wider batch's per-position logits is not contiguous
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    # --- rounds ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, key: Hashable) -> Dict[str, Any]:
        """The member's round report, as run_trial makes it (progress + eval metrics + trainable_params; a
        plateau stop adds rounds_total and stopped_early). The member trains on after it (unless finished)."""
        member = self.members[key]
        if not member.awaiting_eval:
            raise ValueError(f"trial {key!r} is not at the end of a round")
        number = member.rounds_done + 1
        metrics: Dict[str, Any] = {
            **round_report(number, member.plan, member.engine.optimizer_steps, member.micro_batches, member.losses),
            **self._eval_metrics(member), "trainable_params": member.trainable_params,
        }
        if member.questions:
            with self._routed_to(member), self._autocast_context():
                metrics.update(generation_round(self.base.model, self.base.tokenizer, member.questions,
                                                member.settings.generation, current_context()))
        metrics.update(member.base_figures)
        member.rounds_done, member.awaiting_eval = number, False
        member.stopped_early = stop_on_plateau(member.plateau, metrics, number, len(member.plan.round_ends))
        return metrics

    def _eval_metrics(self, member: Member) -> Dict[str, float]:
        """recipe.evaluate: the member's eval set in its own batches, only its own adapter in the forward."""
        model = self.base.model

        def logits_of(batch):
            self.routing.spans = [(member.slot, 0, batch["input_ids"].shape[0])]
            with self._autocast_context():
                return model(**{name: batch[name].to(self.device) for name in ("input_ids", "attention_mask")}).logits

        return eval_metrics(model, member.data.eval, self.base.task, self.base.num_labels, logits_of)

    def save(self, key: Hashable, output_dir: str, metrics: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """recipe.save for a member: output_dir/adapter in PEFT's format (PeftModel.from_pretrained loads it on
        the base) and, given the round's metrics, output_dir/metrics.json with the diag_* figures and adapter_mb
        added. Returns those metrics. The adapter is written by a PEFT model built for the member's settings
        and given its trained weights, so the files are the ones its solo run would write."""
        member = self.members[key]
        adapter_dir = os.path.join(output_dir, ADAPTER_SUBDIR)
        final = dict(metrics or {})
        with self._taken_out(), _rng_kept(self.device):
            peft_model = apply_adapter(self.base, member.settings.peft, self.base.task)
            try:
                inner = peft_model.base_model.model
                with torch.no_grad():
                    for key_, piece in member.adapter.lora.items():
                        layer = inner.get_submodule(_path(key_))
                        layer.lora_A[_ADAPTER].load_state_dict(piece.lora_A.state_dict())
                        layer.lora_B[_ADAPTER].load_state_dict(piece.lora_B.state_dict())
                    for key_, head in member.adapter.heads.items():
                        inner.get_submodule(_path(key_)).modules_to_save[_ADAPTER].load_state_dict(head.state_dict())
                if metrics is not None:
                    final.update(overfit_gap(metrics))
                    final.update(rank_figures(peft_model))
                peft_model.save_pretrained(adapter_dir, safe_serialization=True)
            finally:
                self.base.model = release_adapter(peft_model)
        final["adapter_mb"] = adapter_mb(adapter_dir)
        if metrics is not None:
            write_metrics(output_dir, final, "packed", 1)
        return final

    # --- the base's modules ----------------------------------------------------------------------------
    def _fresh_adapter(self, settings: TrialSettings) -> MemberAdapter:
        """The member's trainable modules as its solo run starts them: PEFT creates the adapter on the bare base
        right after torch is seeded with the trial's seed (recipe.setup), and the pack takes its modules over."""
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

        adapter = MemberAdapter()
        with self._taken_out(), _rng_kept(self.device):
            torch.manual_seed(settings.training.seed)
            peft_model = apply_adapter(self.base, settings.peft, settings.model.task)
            try:
                for path, module in peft_model.base_model.model.named_modules():
                    if isinstance(module, BaseTunerLayer):
                        # lora.Linear and its bitsandbytes subclasses-in-spirit share the forward LoraPiece does
                        kind = type(module).__name__
                        if not (isinstance(module, LoraLinear) or kind in ("Linear4bit", "Linear8bitLt")) \
                                or module.lora_variant:
                            raise ValueError(f"peft.target_modules: {path} became a {type(module).__module__}.{kind}"
                                             f"; only linear LoRA layers are packed")
                        adapter.lora[_key(path)] = LoraPiece(
                            module.lora_A[_ADAPTER], module.lora_B[_ADAPTER], module.lora_dropout[_ADAPTER],
                            module.scaling[_ADAPTER], cast_before_add=kind != "Linear")
                    elif isinstance(module, ModulesToSaveWrapper):
                        adapter.heads[_key(path)] = module.modules_to_save[_ADAPTER]
                    elif isinstance(module, AuxiliaryTrainingWrapper):
                        raise ValueError(f"{path}: a {type(module).__name__} is not packed")
            finally:
                self.base.model = release_adapter(peft_model)
        adapter.requires_grad_(True)
        return adapter

    def _packed_at(self, path: str, kind) -> nn.Module:
        """The packed module standing at `path`, put there on first use."""
        packed = self._packed.get(path)
        if packed is None:
            packed = self._packed[path] = kind(self.base.model.get_submodule(path), self.routing)
            self._put(path, packed)
        elif not isinstance(packed, kind):
            raise ValueError(f"{path}: a LoRA target in one trial and a trained head (modules_to_save) in another")
        return packed

    def _put(self, path: str, module: nn.Module) -> None:
        parent_path, _, name = path.rpartition(".")
        setattr(self.base.model.get_submodule(parent_path) if parent_path else self.base.model, name, module)

    @contextlib.contextmanager
    def _routed_to(self, member: Member):
        """Every forward meanwhile (generate's, one per new token) runs its whole batch through `member`'s adapter."""
        def route(_module, _args, kwargs):
            rows = next(value.shape[0] for name in ("input_ids", "inputs_embeds")
                        if (value := kwargs.get(name)) is not None)
            self.routing.spans = [(member.slot, 0, rows)]

        handle = self.base.model.register_forward_pre_hook(route, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _taken_out(self):
        """The bare base, for PEFT to build an adapter on: the base's own modules back in place of the packed
        ones meanwhile. (PEFT would not know a packed module, and it freezes every parameter of the model it
        wraps: the other members' weights must not be in it then.)"""
        for path, packed in self._packed.items():
            self._put(path, _original(packed))
        try:
            yield
        finally:
            for path, packed in self._packed.items():
                self._put(path, packed)

    def _autocast_context(self):
        # The solo run's forward runs under autocast where its speed options say so (kernels.enable_autocast).
        if self._autocast:
            return torch.autocast(device_type=self.device.type, dtype=self.base.dtype)
        return contextlib.nullcontext()


def _original(packed: nn.Module) -> nn.Module:
    return packed.base_layer if isinstance(packed, PackedLinear) else packed.original


@contextlib.contextmanager
def _rng_kept(device: torch.device):
    """Seeding for one member's adapter must not reset the RNG the other members' dropout draws from."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield

