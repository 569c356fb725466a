"""Generation-based evaluation: each eval round a trial answers a seeded, capped subset of its eval rows
(greedy, batched with left padding and the KV cache) and scores the answers against the rows' references
with well-kept implementations: exact match and token F1 with SQuAD's normalisation (torchmetrics' port of the
official SQuAD script), ROUGE-L F1 (torchmetrics, as Google's rouge-score) and chrF (sacreBLEU, corpus-level).

Only rows with a reference answer take part: prompt-completion rows (the completion) and messages rows (the
last assistant turn, the conversation before it as the prompt). The subset is the same in every round and
every trial of a search (seeded by GenerationSettings.seed), so the scores compare across trials.
Under torch.distributed each rank answers its share and every rank scores all answers (gathered), so the
metrics do not depend on the number of workers; under ZeRO-3 the ranks generate in step (`synced_gpus`).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, ContextManager, Dict, List, Mapping, Sequence

import torch

from trainers.data import ASSISTANT, MESSAGES, PROMPT_COMPLETION, chat_template_of, render_chat
from trainers.distributed import DistContext, all_gather_objects
from trainers.settings import ANSWERS_KEY, BASE_PREFIX, GENERATE_SECONDS_KEY, DataSettings, GenerationSettings

PROMPT_SHOWN_CHARS = 600             # an example's prompt is kept up to this many characters (its end)


@dataclass(frozen=True)
class Question:
    prompt_ids: List[int]
    prompt: str                      # the prompt as the model sees it (rendered), for the report
    reference: str


def has_references(fmt: str) -> bool:
    return fmt in (PROMPT_COMPLETION, MESSAGES)


def prompt_and_reference(row: Mapping[str, Any], tokenizer, data: DataSettings, fmt: str):
    """(prompt text as rendered for the model, whether the tokenizer adds its special tokens, reference text)."""
    if fmt == PROMPT_COMPLETION and isinstance(row[data.prompt_field], str):
        return row[data.prompt_field], True, row[data.completion_field]
    template = chat_template_of(tokenizer, data)
    if fmt == PROMPT_COMPLETION:
        prompt = list(row[data.prompt_field])
        reference = "\n".join(message["content"] for message in row[data.completion_field])
    else:
        messages = list(row[data.messages_field])
        last = max(index for index, message in enumerate(messages) if message["role"] == ASSISTANT)
        prompt, reference = messages[:last], messages[last]["content"]
    return render_chat(tokenizer, prompt, template, generation_prompt=True), False, reference


def chosen_rows(count: int, rows: int, seed: int) -> List[int]:
    """The indices of the eval rows answered: `rows` of them (all if fewer), seeded, in order."""
    return sorted(random.Random(seed).sample(range(count), min(rows, count)))


def questions(eval_rows: Sequence[Mapping[str, Any]], tokenizer, data: DataSettings, fmt: str,
              settings: GenerationSettings) -> List[Question]:
    """The seeded subset of eval rows as questions; a prompt longer than data.max_length keeps its end."""
    if settings.rows <= 0 or not has_references(fmt):
        return []
    out = []
    for index in chosen_rows(len(eval_rows), settings.rows, settings.seed):
        prompt, special, reference = prompt_and_reference(eval_rows[index], tokenizer, data, fmt)
        ids = list(tokenizer(prompt, add_special_tokens=special)["input_ids"])[-data.max_length:]
        out.append(Question(prompt_ids=ids, prompt=prompt, reference=reference))
    return out


def stop_tokens(model, tokenizer) -> List[int]:
    """The tokenizer's EOS and the model's generation config's (a chat model ends a turn with its own)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(token for token in ids if token is not None)


@torch.no_grad()
def answer(model, tokenizer, questions_: Sequence[Question], settings: GenerationSettings, device: torch.device,
           synced: bool = False) -> List[str]:
    """Greedy answers, `settings.batch_size` rows at a time, left-padded (a batch's prompts end together, so
    every row's next token comes from its own last one) with the KV cache."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
                              use_cache=True, pad_token_id=pad, eos_token_id=stop_tokens(model, tokenizer))
    answers: List[str] = []
    for start in range(0, len(questions_), max(1, settings.batch_size)):
        batch = questions_[start:start + max(1, settings.batch_size)]
        width = max(len(question.prompt_ids) for question in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, question in enumerate(batch):
            input_ids[row, width - len(question.prompt_ids):] = torch.tensor(question.prompt_ids, dtype=torch.long)
            attention_mask[row, width - len(question.prompt_ids):] = 1
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                generation_config=config, synced_gpus=synced)
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [text.strip() for text in answers]


def score(answers: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """eval_exact_match, eval_token_f1 (SQuAD-normalised, mean over rows), eval_rougeL (mean F1 over rows) and
    eval_chrf (corpus chrF), all in [0, 1]."""
    from sacrebleu.metrics import CHRF
    from torchmetrics.functional.text import squad
    from torchmetrics.functional.text.rouge import rouge_score

    if not answers:
        return {}
    predictions = [{"prediction_text": text, "id": str(index)} for index, text in enumerate(answers)]
    targets = [{"answers": {"answer_start": [0], "text": [text]}, "id": str(index)}
               for index, text in enumerate(references)]
    squad_scores = squad(predictions, targets)
    return {
        "eval_exact_match": float(squad_scores["exact_match"]) / 100.0,
        "eval_token_f1": float(squad_scores["f1"]) / 100.0,
        "eval_rougeL": float(rouge_score(list(answers), list(references), rouge_keys="rougeL")["rougeL_fmeasure"]),
        "eval_chrf": CHRF().corpus_score(list(answers), [list(references)]).score / 100.0,
    }


def examples(questions_: Sequence[Question], answers: Sequence[str], count: int) -> List[Dict[str, str]]:
    return [{"prompt": question.prompt[-PROMPT_SHOWN_CHARS:], "reference": question.reference, "answer": text}
            for question, text in zip(questions_[:count], answers[:count])]


def generation_round(model, tokenizer, questions_: Sequence[Question], settings: GenerationSettings,
                     ctx: DistContext, synced: bool = False, prefix: str = "") -> Dict[str, Any]:
    """One round's scores (keys prefixed with `prefix`), its example answers and the seconds it took; the same
    on every rank. Each rank answers rows rank, rank + world_size, ...; shorter shares answer a copy of a row
    (dropped) so that every rank calls generate as often as the others (ZeRO-3 gathers weights collectively)."""
    started = time.perf_counter()
    mine = list(range(ctx.rank, len(questions_), ctx.world_size))
    longest = -(-len(questions_) // ctx.world_size)
    padded = [questions_[index] for index in mine] + [questions_[0]] * (longest - len(mine))
    was_training = model.training
    model.eval()
    try:
        texts = answer(model, tokenizer, padded, settings, ctx.device, synced=synced)
    finally:
        model.train(was_training)
    answered: Dict[int, str] = {}
    for share in all_gather_objects(dict(zip(mine, texts))):
        answered.update(share)
    answers = [answered[index] for index in range(len(questions_))]
    figures = {f"{prefix}{name}": value
               for name, value in score(answers, [question.reference for question in questions_]).items()}
    seconds = max(all_gather_objects(time.perf_counter() - started))
    return {**figures, f"{prefix}{ANSWERS_KEY}": examples(questions_, answers, settings.examples),
            f"{prefix}{GENERATE_SECONDS_KEY}": seconds}


def base_round(model, tokenizer, questions_: Sequence[Question], settings: GenerationSettings, ctx: DistContext,
               adapter_off: ContextManager, synced: bool = False) -> Dict[str, Any]:
    """The same round with the adapter off (inside `adapter_off`): the base model's zero-shot scores and answers
    (base_* keys; none without questions)."""
    if not questions_:
        return {}
    with adapter_off:
        figures = generation_round(model, tokenizer, questions_, settings, ctx, synced, prefix=BASE_PREFIX)
    figures.pop(f"{BASE_PREFIX}{GENERATE_SECONDS_KEY}", None)
    return figures
