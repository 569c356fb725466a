"""Build the stdlib-qa chat dataset (offline, deterministic): questions about Python standard-library
functions, classes and methods, answered with the first sentence of the object's own docstring.

The answers are text by the Python developers (PSF license); the questions are a fixed template. Each row is
one conversation in the `messages` format (TRL's conversational language modeling): a user turn asking what
`module.name` does and the assistant's answer; one conversation in four goes on with a second question about
another object of the same module ("And `module.other`?"), so the data also holds two-turn chats. Usage:

    python examples/data/stdlib_qa/make_stdlib_qa.py [--out DIR] [--conversations N] [--seed S]

Writes DIR/train.jsonl and DIR/eval.jsonl (one {"messages": [...]} per line) and prints counts. The output
depends on the Python version (docstrings change between releases); README.md records the version used.
"""
import argparse
import collections
import importlib
import inspect
import json
import os
import random
import re
import sys
import warnings

MODULES = [
    "argparse", "asyncio", "base64", "bisect", "calendar", "codecs", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.utils", "enum", "fnmatch", "fractions",
    "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "inspect", "io", "ipaddress",
    "itertools", "json", "locale", "logging", "math", "operator", "os", "os.path", "pathlib", "pprint", "queue",
    "random", "re", "secrets", "shlex", "shutil", "socket", "sqlite3", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "types", "typing", "unicodedata",
    "urllib.parse", "uuid", "xml.etree.ElementTree", "zipfile",
]
# __module__ values of C accelerators / platform modules -> the module they serve.
ALIASES = {"posix": "os", "posixpath": "os.path", "_io": "io", "_decimal": "decimal", "_pydecimal": "decimal",
           "_random": "random", "_operator": "operator", "_bisect": "bisect", "_heapq": "heapq", "_socket": "socket",
           "_json": "json", "_csv": "csv", "_struct": "struct", "_sqlite3": "sqlite3", "_functools": "functools",
           "_collections": "collections", "_datetime": "datetime", "_elementtree": "xml.etree.ElementTree",
           "_queue": "queue", "_asyncio": "asyncio", "_string": "string", "_sre": "re", "_codecs": "codecs",
           "_locale": "locale", "_statistics": "statistics", "_thread": "threading", "_hashlib": "hashlib",
           "_sha256": "hashlib", "_md5": "hashlib", "_blake2": "hashlib", "_posixsubprocess": "subprocess",
           "_uuid": "uuid", "_pickle": "pickle"}
SIG_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")       # old-style "name(args) -> type" lines
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`'\"])")  # where a first sentence ends
QUESTIONS = ("What does `{name}` do?", "What is `{name}` for?", "Explain `{name}` in one sentence.")
CLASS_QUESTIONS = ("What is `{name}`?", "What is `{name}` for?", "Explain `{name}` in one sentence.")
FOLLOW_UP = "And `{name}`?"


def first_sentence(doc, min_words=4, max_words=45):
    """The first sentence of a docstring's first paragraph (signature and >>> lines dropped), or None."""
    if not doc or not isinstance(doc, str):
        return None
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = [l.strip() for l in para.splitlines()
                 if l.strip() and not SIG_LINE.match(l.strip()) and not l.strip().startswith(">>>")]
        if lines:
            break
    else:
        return None
    text = " ".join(" ".join(lines).split())
    sentence = SENTENCE_END.split(text, maxsplit=1)[0]
    words = sentence.split()
    if not (min_words <= len(words) <= max_words) or "help(type(self))" in sentence or sentence.endswith(":"):
        return None
    return sentence


def defined_in(obj, modname):
    module = getattr(obj, "__module__", None) or ""
    return ALIASES.get(module, module) == modname


def objects(modname):
    """(dotted name, is a class, first sentence) of the public functions and classes a module defines, and of
    the public methods those classes define themselves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(modname)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)) or not defined_in(obj, modname):
            continue
        yield f"{modname}.{name}", inspect.isclass(obj), obj
        if inspect.isclass(obj):
            for attr_name, attr in sorted(obj.__dict__.items()):
                if attr_name.startswith("_"):
                    continue
                if isinstance(attr, (classmethod, staticmethod)):
                    attr = attr.__func__
                if inspect.isroutine(attr):
                    yield f"{modname}.{name}.{attr_name}", False, attr


def collect():
    """module -> [(name, is a class, answer)]; each object once, answers that several names share left out."""
    seen, found = set(), collections.defaultdict(list)
    with warnings.catch_warnings():   # typing.io / typing.re say they are deprecated when touched
        warnings.simplefilter("ignore")
        for modname in MODULES:
            for name, is_class, obj in objects(modname):
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
                answer = first_sentence(getattr(obj, "__doc__", None))
                if answer:
                    found[modname].append((name, is_class, answer))
    answers = collections.Counter(answer for items in found.values() for _n, _c, answer in items)
    return {modname: [item for item in items if answers[item[2]] == 1] for modname, items in found.items()}


def question(rng, name, is_class):
    return rng.choice(CLASS_QUESTIONS if is_class else QUESTIONS).format(name=name)


def conversations(found, rng, total, follow_up_share):
    """Conversations spread over the modules (round-robin over shuffled objects), one in four two-turn."""
    pools = {}
    for modname in sorted(found):
        items = sorted(found[modname])
        rng.shuffle(items)
        pools[modname] = items
    chats = []
    while len(chats) < total and any(pools.values()):
        for modname in sorted(pools):
            items = pools[modname]
            if not items or len(chats) >= total:
                continue
            name, is_class, answer = items.pop()
            messages = [{"role": "user", "content": question(rng, name, is_class)},
                        {"role": "assistant", "content": answer}]
            if items and rng.random() < follow_up_share:
                name2, _is_class2, answer2 = items.pop()
                messages += [{"role": "user", "content": FOLLOW_UP.format(name=name2)},
                             {"role": "assistant", "content": answer2}]
            chats.append({"module": modname, "messages": messages})
    return chats


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--conversations", type=int, default=1400)
    parser.add_argument("--eval-frac", type=float, default=0.2)
    parser.add_argument("--follow-up", type=float, default=0.25, help="share of two-turn conversations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    found = collect()
    chats = conversations(found, rng, args.conversations, args.follow_up)
    rng.shuffle(chats)
    n_eval = round(len(chats) * args.eval_frac)
    splits = {"train": chats[n_eval:], "eval": chats[:n_eval]}
    questions = {split: {m["content"] for chat in rows for m in chat["messages"] if m["role"] == "user"}
                 for split, rows in splits.items()}
    answers = {split: {m["content"] for chat in rows for m in chat["messages"] if m["role"] == "assistant"}
               for split, rows in splits.items()}
    assert not answers["train"] & answers["eval"]   # no answer is learnt in train and asked in eval
    os.makedirs(args.out, exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(args.out, f"{split}.jsonl"), "w", encoding="utf-8") as handle:
            for chat in rows:
                handle.write(json.dumps({"messages": chat["messages"]}, ensure_ascii=False) + "\n")
    print(json.dumps({
        "python": sys.version.split()[0],
        "objects_available": sum(len(items) for items in found.values()),
        "modules": len(found),
        **{f"{split}_conversations": len(rows) for split, rows in splits.items()},
        **{f"{split}_two_turn": sum(len(chat["messages"]) == 4 for chat in rows) for split, rows in splits.items()},
        **{f"{split}_questions": len(questions[split]) for split in splits},
    }, indent=1))


if __name__ == "__main__":
    main()
