"""Build stdlib_ner/: sentences of the Python standard library's docstrings, each word tagged in BIO.

Entity types, each found by a rule that needs no judgement:
  EXC    the name of a built-in exception class (ValueError, KeyError, ...; not bare Exception or Warning)
  FUNC   a called name, written with its parentheses: `open()`, `os.path.join()`
  CONST  a built-in constant: None, True, False, NotImplemented, Ellipsis
(Dotted module names, `os.path`, were tried as a fourth type: too rare in docstring prose, 7 in 750 sentences.)

The docstrings are read from the source files with `ast` (nothing is imported), split into sentences and
words (`\\w+` runs and single punctuation marks); a word inside an entity's characters takes B-TYPE (the first
one) or I-TYPE. Deterministic for one Python version: python examples/data/stdlib_ner/make_stdlib_ner.py
"""
from __future__ import annotations

import argparse
import ast
import builtins
import os
import random
import re
import sys
import sysconfig

SKIPPED_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
                "__pycache__", "pydoc_data", "__phello__", "dist-packages"}
# Bare "Exception" and "Warning" are English words too ("Warning: the API ..."): only compound names count.
EXCEPTIONS = sorted(name for name, value in vars(builtins).items()
                    if isinstance(value, type) and issubclass(value, BaseException) and not name.startswith("_")
                    and name not in ("Exception", "Warning"))
CONSTANTS = ("None", "True", "False", "NotImplemented", "Ellipsis")
_NAME = r"[A-Za-z_]\w*"
WORD = re.compile(r"\w+|[^\w\s]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(])")


def source_files(stdlib: str):
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(root, name)


def docstrings(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text:
                yield text


def sentences(docstring: str):
    """Prose sentences: paragraphs without doctest or indented (code) lines, whitespace collapsed."""
    for paragraph in re.split(r"\n\s*\n", docstring):
        lines = paragraph.splitlines()
        if any(line.startswith((" ", "\t")) or ">>>" in line or "..." in line for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        for sentence in SENTENCE_END.split(text):
            if sentence.endswith(".") and sentence[0].isupper():
                yield sentence


def entity_spans(sentence: str):
    """(start, end, type) of the entities, earlier rules first; a later match overlapping one is dropped."""
    found = []
    rules = [("FUNC", rf"(?<![\w.]){_NAME}(?:\.{_NAME})*\(\)"),
             ("EXC", rf"(?<![\w.])(?:{'|'.join(EXCEPTIONS)})(?![\w(])"),
             ("CONST", rf"(?<![\w.])(?:{'|'.join(CONSTANTS)})(?![\w(])")]
    for kind, pattern in rules:
        for match in re.finditer(pattern, sentence):
            if not any(match.start() < end and start < match.end() for start, end, _ in found):
                found.append((match.start(), match.end(), kind))
    return found


def tag(sentence: str):
    spans = entity_spans(sentence)
    words, tags = [], []
    inside = None
    for match in WORD.finditer(sentence):
        span = next((s for s in spans if s[0] <= match.start() and match.end() <= s[1]), None)
        words.append(match.group(0))
        tags.append("O" if span is None else ("I-" if span == inside else "B-") + span[2])
        inside = span
    return words, tags


def write_conll(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("-DOCSTART- O\n\n")
        for words, tags in rows:
            handle.writelines(f"{word} {label}\n" for word, label in zip(words, tags))
            handle.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--eval", type=int, default=150)
    parser.add_argument("--plain-share", type=float, default=0.2, help="share of sentences without entities")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stdlib = sysconfig.get_paths()["stdlib"]
    seen, tagged, plain = set(), [], []
    for path in source_files(stdlib):
        for docstring in docstrings(path):
            for sentence in sentences(docstring):
                words, tags = tag(sentence)
                if not 6 <= len(words) <= 40 or sentence in seen:
                    continue
                seen.add(sentence)
                (tagged if any(t != "O" for t in tags) else plain).append((words, tags))
    rng = random.Random(args.seed)
    total = args.train + args.eval
    n_plain = round(total * args.plain_share)
    rng.shuffle(tagged)
    rng.shuffle(plain)
    rows = tagged[:total - n_plain] + plain[:n_plain]
    rng.shuffle(rows)
    train, held = rows[:args.train], rows[args.train:total]
    train_tags = {t for _, tags in train for t in tags}
    assert {t for _, tags in held for t in tags} <= train_tags, "an eval tag is missing from train"
    here = os.path.dirname(os.path.abspath(__file__))
    write_conll(os.path.join(here, "train.conll"), train)
    write_conll(os.path.join(here, "eval.conll"), held)
    for name, part in (("train", train), ("eval", held)):
        counts = {}
        for _, tags in part:
            for t in tags:
                if t.startswith("B-"):
                    counts[t[2:]] = counts.get(t[2:], 0) + 1
        words = sum(len(w) for w, _ in part)
        print(f"{name}: {len(part)} sentences, {words} words, entities {dict(sorted(counts.items()))}")
    print(f"from {len(tagged)} tagged and {len(plain)} plain sentences; Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
