"""Build examples/data/man_page_sections/: one-line man page summaries labelled by manual section.

The text of a row is the summary of a manual page's NAME section, the part after the dash
("ls \\- list directory contents" gives "list directory contents"), as `whatis` shows it; the page's own
names are left out, so identifiers such as `pthread_create` do not give the section away. The label is
the section the page is filed in (the man<N>/ directory). Pages are read from the manual pages
installed on this machine (/usr/share/man, English only), so nothing is downloaded and nothing was
written by this project.

    python examples/data/man_page_sections/make_man_page_sections.py   # --cap 300 --eval-frac 0.2 --seed 0

Steps: read every man<N>/ page of the kept sections (gzip), skip `.so` links and the generated `gcloud*`
pages (16,600 near-identical command pages of one CLI, which would make up most of section 1), take the
NAME section (man(7) `.SH NAME` or mdoc(7) `.Nd`), strip roff escapes, keep summaries of 2 to 40
words; drop exact duplicate summaries across sections (kept once if all copies share a section); per
section sort, shuffle with random.Random(seed), cap, and split eval off. The same pages give the same
files (no hash order is used); other machines have other pages installed, hence other files.
"""
import argparse
import collections
import gzip
import json
import os
import random
import re
import subprocess

MAN = "/usr/share/man"
HERE = os.path.dirname(os.path.abspath(__file__))
# section directory -> label. 4 (devices, 38 pages) and 6 (games, 1 page) have too few pages here.
SECTIONS = {"1": "commands", "2": "syscalls", "3": "library", "5": "formats", "7": "overviews", "8": "admin"}
SKIP_PREFIXES = ("gcloud",)

ESCAPES = [
    (r"\\f(\[[^\]]*\]|\(..|.)", ""),            # font changes: \fB \fI \fR \fP \f(CW \f[B]
    (r"\\s[-+]?\d", ""),                        # size changes
    (r"\\\*(\[[^\]]*\]|\(..|.)", ""),           # string interpolations (\*(lq, \*R ...)
    (r"\\\(em|\\\(en|\\\[em\]|\\\[en\]", "-"),
    (r"\\\(aq|\\\[aq\]|\\\(cq|\\\(oq", "'"),
    (r"\\\(dq|\\\(lq|\\\(rq|\\\[dq\]", '"'),
    (r"\\\(..|\\\[[^\]]*\]", ""),               # any other special character
    (r"\\-", "-"), (r"\\\.", "."), (r"\\e", "\\"), (r"\\[&|^%:,/]", ""), (r"\\ ", " "), (r"\\c", ""),
]


def clean(text: str) -> str:
    for pattern, repl in ESCAPES:
        text = re.sub(pattern, lambda _, repl=repl: repl, text)   # a function: the replacement is taken literally
    return " ".join(text.split())


def summary(source: str):
    """The NAME section's summary of a page's roff source, or None."""
    lines = source.splitlines()
    for line in lines:                                 # mdoc: .Nd is the summary itself
        if line.startswith(".Nd "):
            return clean(line[4:]).strip('"').strip()
    name = []
    inside = False
    for line in lines:
        head = re.match(r'^\.S[Hh]\s+"?([^"]*)"?\s*$', line)
        if head:
            if inside:
                break
            inside = head.group(1).strip().upper() in ("NAME", "NAME:")
            continue
        if not inside or line.startswith(("'", '.\\"')):
            continue
        if line.startswith("."):   # font macros (`.B ls`) carry words; other requests (.de, .nr, .if) do not
            font = re.match(r"^\.(?:B|I|BR|RB|BI|IB|IR|RI|SM|SB)\s+(.*)$", line)
            if font:
                name.append(font.group(1))
            continue
        name.append(line)
    text = " ".join(name)
    # the dash between names and summary stands alone; a dash inside a name (dpkg\-scanpackages) does not
    parts = re.split(r"\s(?:\\-|-|--|\\\(em|\\\[em\])\s", " ".join(text.split()), maxsplit=1)
    if len(parts) != 2:
        return None
    text = clean(parts[1]).strip('"').strip()
    again = re.match(r"^[\w.+-]+(?:, [\w.+-]+)* - (.*)$", text)   # pages that repeat their names after the dash
    text = again.group(1) if again else text
    return None if "\\" in text or " . " in text else text


def read_pages():
    """(label, summary, file name) of every usable page, in file-name order."""
    rows = []
    for section, label in SECTIONS.items():
        folder = os.path.join(MAN, f"man{section}")
        for name in sorted(os.listdir(folder)):
            if name.startswith(SKIP_PREFIXES) or not name.endswith(".gz"):
                continue
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue                                            # an alias of another page
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
                source = handle.read()
            if source.lstrip().startswith(".so "):
                continue                                            # a roff link to another page
            text = summary(source)
            if text and 2 <= len(text.split()) <= 40:
                rows.append((label, text, name))
    return rows


def owners(names_by_label):
    """Debian package -> page count per label (for the README's provenance table)."""
    counts = collections.defaultdict(collections.Counter)
    for label, names in names_by_label.items():
        section = next(s for s, l in SECTIONS.items() if l == label)
        paths = [os.path.join(MAN, f"man{section}", n) for n in names]
        for start in range(0, len(paths), 200):
            out = subprocess.run(["dpkg", "-S", *paths[start:start + 200]], capture_output=True, text=True, check=False).stdout
            for line in out.splitlines():
                package = line.split(":", 1)[0]
                counts[label][package] += 1
    return counts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cap", type=int, default=300, help="rows per class, train + eval")
    parser.add_argument("--eval-frac", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--owners", action="store_true", help="print which Debian packages the kept pages come from")
    args = parser.parse_args()

    pages = read_pages()
    labels_of = collections.defaultdict(set)
    for label, text, _ in pages:
        labels_of[text].add(label)
    seen, by_label = set(), collections.defaultdict(list)
    for label, text, name in pages:
        if len(labels_of[text]) > 1 or text in seen:                # ambiguous, or a duplicate
            continue
        seen.add(text)
        by_label[label].append((text, name))

    rng = random.Random(args.seed)
    train, evaluation, kept_names = [], [], {}
    for label in SECTIONS.values():
        rows = sorted(by_label[label])
        rng.shuffle(rows)
        rows = rows[:args.cap]
        kept_names[label] = [name for _, name in rows]
        cut = round(len(rows) * args.eval_frac)
        evaluation += [{"text": t, "label": label} for t, _ in rows[:cut]]
        train += [{"text": t, "label": label} for t, _ in rows[cut:]]
        print(f"{label:10s} pages {len(by_label[label]):5d}  train {len(rows) - cut:4d}  eval {cut:4d}")
    rng.shuffle(train)
    rng.shuffle(evaluation)
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}
    for name, rows in (("train", train), ("eval", evaluation)):
        with open(os.path.join(HERE, f"{name}.jsonl"), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"train {len(train)} rows, eval {len(evaluation)} rows")
    if args.owners:
        for label, counter in owners(kept_names).items():
            print(label, ", ".join(f"{p} {n}" for p, n in counter.most_common(12)))


if __name__ == "__main__":
    main()
