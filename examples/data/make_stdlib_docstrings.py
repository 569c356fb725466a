"""Build the stdlib-docstrings text-classification dataset (offline, deterministic).

Texts are the docstrings of public functions, classes, methods and properties of a fixed
list of Python standard-library modules (text by the Python developers, PSF license);
the label is the family of modules the object was defined in. Usage:

    python examples/data/make_stdlib_docstrings.py [--out DIR] [--cap N] [--seed S]

Writes DIR/train.jsonl and DIR/eval.jsonl (one {"text": ..., "label": ...} per line)
and prints class counts. The output depends on the Python version (docstrings change
between releases); the committed files record the version in examples/data/README.md.
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

# family -> modules. An object counts for a module when it is *defined* there (its
# __module__, with C-accelerator aliases below), so re-exports do not leak across families.
FAMILIES = {
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "codecs", "locale",
             "gettext", "html", "html.parser", "shlex", "reprlib", "pprint", "tokenize"],
    "math": ["math", "cmath", "decimal", "fractions", "statistics", "random", "numbers",
             "operator", "bisect", "heapq", "itertools", "array"],
    "files": ["os", "os.path", "posixpath", "pathlib", "shutil", "glob", "fnmatch", "tempfile",
              "stat", "filecmp", "io", "fileinput", "linecache", "mmap"],
    "network": ["socket", "ssl", "select", "http.client", "http.server", "http.cookies",
                "http.cookiejar", "urllib.request", "urllib.parse", "urllib.response",
                "urllib.error", "urllib.robotparser", "smtplib", "ftplib", "imaplib", "poplib",
                "socketserver", "ipaddress", "email.message", "email.utils", "email.parser",
                "email.headerregistry", "email.mime.text", "email.header", "email.policy",
                "xmlrpc.client", "xmlrpc.server", "wsgiref.simple_server", "wsgiref.handlers",
                "mimetypes", "webbrowser"],
    "concurrency": ["threading", "_thread", "multiprocessing", "multiprocessing.pool",
                    "multiprocessing.managers", "multiprocessing.synchronize",
                    "multiprocessing.queues", "multiprocessing.connection",
                    "multiprocessing.shared_memory", "multiprocessing.process", "asyncio",
                    "asyncio.events", "asyncio.base_events", "asyncio.tasks", "asyncio.futures",
                    "asyncio.locks", "asyncio.queues", "asyncio.streams", "asyncio.subprocess",
                    "asyncio.transports", "asyncio.protocols", "asyncio.runners",
                    "asyncio.taskgroups", "asyncio.timeouts", "concurrent.futures",
                    "concurrent.futures.thread", "concurrent.futures.process", "queue",
                    "subprocess", "sched", "selectors", "signal", "contextvars"],
    "formats": ["json", "json.decoder", "json.encoder", "csv", "pickle", "pickletools",
                "xml.etree.ElementTree", "xml.dom.minidom", "xml.sax", "xml.sax.handler",
                "xml.sax.saxutils", "xml.sax.xmlreader", "xml.parsers.expat", "configparser",
                "zipfile", "tarfile", "gzip", "bz2", "lzma", "zlib", "base64", "binascii",
                "struct", "plistlib", "sqlite3", "tomllib", "netrc", "quopri", "uu", "marshal",
                "shelve", "dbm"],
}
# Built-in types whose own methods also count for a family.
BUILTIN_TYPES = {"text": [str], "math": [int, float, complex]}
# __module__ values of C accelerators / platform modules -> the module they serve.
ALIASES = {"posix": "os", "_io": "io", "_decimal": "decimal", "_pydecimal": "decimal",
           "_random": "random", "_operator": "operator", "_bisect": "bisect", "_heapq": "heapq",
           "_socket": "socket", "_ssl": "ssl", "_json": "json", "_csv": "csv", "_pickle": "pickle",
           "_struct": "struct", "_bz2": "bz2", "_lzma": "lzma", "_sqlite3": "sqlite3",
           "_elementtree": "xml.etree.ElementTree", "pyexpat": "xml.parsers.expat",
           "_queue": "queue", "_asyncio": "asyncio", "_string": "string", "_sre": "re",
           "_codecs": "codecs", "_locale": "locale", "_statistics": "statistics",
           "_contextvars": "contextvars", "_thread": "_thread", "_signal": "signal",
           "_posixsubprocess": "subprocess", "_multiprocessing": "multiprocessing",
           "_stat": "stat", "_ssl": "ssl"}

SIG_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")  # old-style "name(args) -> type" lines


def clean(doc, max_words=60, min_words=6):
    """First paragraph(s) of a docstring, whitespace collapsed, up to max_words words."""
    if not doc or not isinstance(doc, str):
        return None
    paras = [p.strip() for p in re.split(r"\n\s*\n", inspect.cleandoc(doc))]
    words = []
    for p in paras:
        lines = [l for l in p.splitlines()
                 if l.strip() and not SIG_LINE.match(l.strip()) and not l.strip().startswith(">>>")]
        if not lines:
            continue
        words += " ".join(lines).split()
        if len(words) >= 12:  # first paragraph, or a couple of short ones
            break
    if len(words) < min_words:
        return None
    text = " ".join(words[:max_words])
    if "See help(type(self)) for accurate signature" in text:
        return None
    return text


def owner_ok(obj, modname):
    m = getattr(obj, "__module__", None) or ""
    m = ALIASES.get(m, m)
    return m == modname or m.startswith(modname + ".")


def members(mod, modname):
    """(qualname, object) for public objects defined in `modname` and their own members."""
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_"):
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not owner_ok(obj, modname):
            continue
        yield name, obj
        if inspect.isclass(obj):
            for an, attr in sorted(obj.__dict__.items()):
                if an.startswith("_"):
                    continue
                if isinstance(attr, (classmethod, staticmethod)):
                    attr = attr.__func__
                if inspect.isroutine(attr) or isinstance(attr, property) or inspect.isdatadescriptor(attr):
                    yield f"{name}.{an}", attr


def collect():
    seen_ids, rows, missing = set(), [], []
    for family, mods in FAMILIES.items():
        for modname in mods:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mod = importlib.import_module(modname)
            except ImportError:
                missing.append(modname)
                continue
            for qual, obj in members(mod, mod.__name__ if modname == "os.path" else modname):
                if id(obj) in seen_ids:
                    continue
                seen_ids.add(id(obj))
                text = clean(getattr(obj, "__doc__", None))
                if text:
                    rows.append({"text": text, "label": family, "src": f"{modname}.{qual}"})
        for typ in BUILTIN_TYPES.get(family, []):
            for an, attr in sorted(typ.__dict__.items()):
                if an.startswith("_") or id(attr) in seen_ids:
                    continue
                seen_ids.add(id(attr))
                text = clean(getattr(attr, "__doc__", None))
                if text:
                    rows.append({"text": text, "label": family, "src": f"{typ.__name__}.{an}"})
    return rows, missing


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "stdlib_docstrings"))
    ap.add_argument("--cap", type=int, default=360, help="max rows per class before the split")
    ap.add_argument("--eval-frac", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    rows, missing = collect()
    # Exact duplicate texts: keep one copy when every copy has the same label, drop all otherwise.
    by_text = collections.defaultdict(set)
    for r in rows:
        by_text[r["text"]].add(r["label"])
    uniq = {}
    for r in rows:
        if len(by_text[r["text"]]) == 1 and r["text"] not in uniq:
            uniq[r["text"]] = r
    rng = random.Random(a.seed)
    train, evals, raw = [], [], collections.Counter()
    for family in FAMILIES:
        fam = sorted((r for r in uniq.values() if r["label"] == family), key=lambda r: r["text"])
        raw[family] = len(fam)
        rng.shuffle(fam)
        fam = fam[:a.cap]
        n_eval = round(len(fam) * a.eval_frac)
        evals += fam[:n_eval]
        train += fam[n_eval:]
    rng.shuffle(train)
    rng.shuffle(evals)
    assert not {r["text"] for r in train} & {r["text"] for r in evals}
    os.makedirs(a.out, exist_ok=True)
    for split, data in (("train", train), ("eval", evals)):
        with open(os.path.join(a.out, f"{split}.jsonl"), "w") as f:
            for r in data:
                f.write(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n")
    print(json.dumps({"python": sys.version.split()[0], "missing_modules": missing,
                      "available_per_class": raw,
                      "train": collections.Counter(r["label"] for r in train),
                      "eval": collections.Counter(r["label"] for r in evals)}, indent=1))


if __name__ == "__main__":
    main()
