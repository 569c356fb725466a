"""Tiny deterministic models, tokenizers and learnable data, built locally (no hub access).

Tests and benchmarks need real `from_pretrained` directories without a download: each builder
writes a 2-layer model with a small hidden size plus a matching word-level tokenizer, seeded so
that the same call always writes the same weights.
"""
from __future__ import annotations

import json
import os
import random
from typing import List, Sequence

# Words the learnable data sets are made of. The tokenizer's vocabulary is exactly these words
# plus special tokens, so every word of the generated data is a single known token.
POSITIVE_WORDS = ("good", "great", "fine", "happy", "nice")
NEGATIVE_WORDS = ("bad", "awful", "poor", "sad", "ugly")
NEUTRAL_WORDS = (
    "the", "a", "movie", "film", "plot", "actor", "scene", "story", "was", "is", "very", "quite",
    "and", "but", "it", "this", "that", "music", "ending", "start", "one", "two", "three", "four",
    "five", "six", "seven", "eight", "nine", "ten", "red", "blue", "green", "cat", "dog", "bird",
)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>")
VOCAB: List[str] = list(SPECIAL_TOKENS) + list(POSITIVE_WORDS) + list(NEGATIVE_WORDS) + list(NEUTRAL_WORDS)

# The tiny tokenizer has no chat template: chat tests give this one, made of tokens it knows ([SEP] opens a user or
# system turn, <s> an assistant turn, </s> ends it).
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<s> {{ m['content'] }} </s> "
                      "{% else %}[SEP] {{ m['content'] }} {% endif %}{% endfor %}"
                      "{% if add_generation_prompt %}<s> {% endif %}")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Small but not degenerate: 64 is the smallest width where bitsandbytes' 4-bit blocks (64 values)
# tile every weight, so the same tiny llama serves the NF4 tests.
_HIDDEN = 64
_INTERMEDIATE = 128
_HEADS = 4
_LAYERS = 2
_MAX_POSITIONS = 256


def build_tiny_tokenizer(causal: bool = False):
    """The word-level tokenizer of the tiny models: BERT-style ([CLS] text [SEP], token_type_ids) unless
    `causal`, where texts are left as they are and only input_ids / attention_mask are returned."""
    if causal:
        # A causal LM sees no token_type_ids: llama's forward would reject them.
        return _build_tokenizer(with_cls_sep=False, model_input_names=["input_ids", "attention_mask"])
    return _build_tokenizer(with_cls_sep=True, model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def _build_tokenizer(with_cls_sep: bool, model_input_names: Sequence[str]):
    """A word-level fast tokenizer over VOCAB; `with_cls_sep` adds BERT's [CLS] ... [SEP] template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_cls_sep:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="<s>", eos_token="</s>",
        model_input_names=list(model_input_names),
        model_max_length=_MAX_POSITIONS,
    )


def build_tiny_causal_lm(path: str, arch: str = "llama", seed: int = 0) -> str:
    """Write a 2-layer causal LM (`llama` or `gpt2`) and its tokenizer to `path`; return `path`."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    vocab = {word: index for index, word in enumerate(VOCAB)}
    ids = dict(pad_token_id=vocab["[PAD]"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"])
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(VOCAB), hidden_size=_HIDDEN, intermediate_size=_INTERMEDIATE,
            num_hidden_layers=_LAYERS, num_attention_heads=_HEADS, num_key_value_heads=_HEADS // 2,
            max_position_embeddings=_MAX_POSITIONS, tie_word_embeddings=False, **ids,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(VOCAB), n_embd=_HIDDEN, n_inner=_INTERMEDIATE, n_layer=_LAYERS,
            n_head=_HEADS, n_positions=_MAX_POSITIONS, **ids,
        )
    else:
        raise ValueError(f"arch must be one of ['gpt2', 'llama'], got {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    build_tiny_tokenizer(causal=True).save_pretrained(path)
    return path


def build_tiny_classifier(path: str, num_labels: int = 2, seed: int = 0) -> str:
    """Write a 2-layer BERT-like classifier (attention modules `query`, `key`, `value`) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    return _build_tiny_bert(path, AutoModelForSequenceClassification, num_labels, seed)


def build_tiny_token_classifier(path: str, num_labels: int, seed: int = 0) -> str:
    """Write a 2-layer BERT-like token classifier (one output per tag) and its tokenizer to `path`."""
    from transformers import AutoModelForTokenClassification

    return _build_tiny_bert(path, AutoModelForTokenClassification, num_labels, seed)


def _build_tiny_bert(path: str, auto_class, num_labels: int, seed: int) -> str:
    import torch
    from transformers import BertConfig

    vocab = {word: index for index, word in enumerate(VOCAB)}
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=_HIDDEN, intermediate_size=_INTERMEDIATE,
        num_hidden_layers=_LAYERS, num_attention_heads=_HEADS, max_position_embeddings=_MAX_POSITIONS,
        num_labels=num_labels, pad_token_id=vocab["[PAD]"],
        # With BERT's 0.02 a random tiny encoder gives nearly the same [CLS] features for every input,
        # and only LoRA gets anywhere in a few steps; 0.1 lets every PEFT method learn the toy task.
        initializer_range=0.1,
        # dropout off: tiny-data tests compare outputs between runs and after reloads
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    model = auto_class.from_config(config)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    build_tiny_tokenizer(causal=False).save_pretrained(path)
    return path


def make_learnable_token_data(path: str, n: int, seed: int = 0) -> str:
    """Write `n` jsonl rows {tokens, tags} in BIO: each sentiment word is an entity of its polarity (POS / NEG),
    and "very" before one is the start of that entity ("very good": B-POS I-POS). Tags: B-NEG, B-POS, I-NEG,
    I-POS, O; the type is a function of the word, the B/I split needs the word before it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(1, 3)):
            for word in _sentence(rng, rng.randint(1, 3)):
                if word != "very":
                    words.append(word)
                    tags.append("O")
            kind = rng.choice(("POS", "NEG"))
            sentiment = rng.choice(POSITIVE_WORDS if kind == "POS" else NEGATIVE_WORDS)
            if rng.random() < 0.4:
                words += ["very", sentiment]
                tags += [f"B-{kind}", f"I-{kind}"]
            else:
                words.append(sentiment)
                tags.append(f"B-{kind}")
        rows.append({"tokens": words, "tags": tags})
    _write_jsonl(path, rows)
    return path


def _sentence(rng: random.Random, length: int) -> List[str]:
    return [rng.choice(NEUTRAL_WORDS) for _ in range(length)]


def make_learnable_classification_data(path: str, n: int, seed: int = 0) -> str:
    """Write `n` jsonl rows {text, label}: label "1" when the sentiment words are positive, "0" when negative.

    Each row holds one to three sentiment words of its label's polarity among neutral filler, so the
    label is a function of the words and a model that can attend to them learns it in a few steps.
    Classes alternate before shuffling, so they are balanced.
    """
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        label = index % 2
        words = _sentence(rng, rng.randint(2, 6))
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE_WORDS if label else NEGATIVE_WORDS))
        rows.append({"text": " ".join(words), "label": str(label)})
    rng.shuffle(rows)
    _write_jsonl(path, rows)
    return path


def make_learnable_lm_data(path: str, n: int, seed: int = 0) -> str:
    """Write `n` jsonl rows {text}: counting sequences ("three four five six ..."), easy to predict."""
    rng = random.Random(seed)
    numbers = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    rows = []
    for _ in range(n):
        start = rng.randint(0, 4)
        length = rng.randint(4, 6)
        rows.append({"text": " ".join(numbers[start:start + length])})
    _write_jsonl(path, rows)
    return path


def _write_jsonl(path: str, rows: List[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def counting_conversations(n: int, distinct: bool = False) -> List[dict]:
    """Chat rows a tiny model learns in a few steps: the user says three numbers in order, the assistant the next
    two. `distinct`: a neutral word after the numbers makes every question (up to 180) differ, as validate wants
    of eval rows (a copy of a train row would measure memorisation)."""
    rows = []
    for index in range(n):
        start = index % 5
        question = " ".join(NUMBER_WORDS[start:start + 3])
        if distinct:
            question += f" {NEUTRAL_WORDS[index // 5]}"
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": " ".join(NUMBER_WORDS[start + 3:start + 5])}]})
    return rows
