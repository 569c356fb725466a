"""Reading a spec file's YAML: safe, strict about what PyYAML lets pass, and bounded.

`yaml.safe_load` alone refuses Python object tags, but it keeps the last of two equal keys without a
word (`trials: 2` then `trials: 500` silently means 500), and it builds alias trees ("billion laughs":
nine anchors of nine aliases each) that are small in memory but expand to 9**9 values as soon as
anything copies or prints them. Here the file is composed into YAML nodes first, those are checked,
and only then are Python values constructed (with the safe constructors).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import yaml

from search.spec.fields import SpecError

# A spec has a few hundred values; this many (after aliases are expanded) means a file that is not one.
MAX_VALUES = 100_000
# A spec nests four levels (the top mapping, space, r, a list of choices); far deeper is not a spec.
MAX_DEPTH = 32


def read_spec_yaml(path: str) -> Any:
    """The Python data of the YAML file at `path`; SpecError naming the file (and key) otherwise."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise SpecError([f"{path}: no such spec file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{path}: cannot read the spec file ({exc})"]) from None
    if not text.strip():
        raise SpecError([f"{path}: the spec file is empty (a spec is a YAML mapping: name, model, data, ...)"])
    try:
        _check_depth(text, path)
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _check_nodes(node, path)
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise SpecError([f"{path}: not valid YAML{_where(exc)}: {_reason(exc)}"]) from None


# libyaml's parser when PyYAML was built with it (much faster on a large file), else the pure-Python one
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_depth(text: str, path: str) -> None:
    """SpecError for collections nested deeper than MAX_DEPTH, found from the parser's flat event stream:
    composing `[[[[...` a hundred thousand deep recurses once per level (libyaml's composer crashes)."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                raise SpecError([f"{path}: the YAML nests more than {MAX_DEPTH} levels deep (at line "
                                 f"{mark.line + 1}, column {mark.column + 1}); a spec nests a few"])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _reason(exc: yaml.YAMLError) -> str:
    return getattr(exc, "problem", None) or str(exc).splitlines()[0]


def _check_nodes(root: yaml.Node, path: str) -> None:
    """SpecError for a tree too large or deep once aliases expand, or for keys given twice."""
    if _expanded_size(root, {}, depth=0) > MAX_VALUES:
        # checked first: walking such a tree for anything else would be as large
        raise SpecError([f"{path}: the YAML aliases expand to more than {MAX_VALUES} values, nest more than "
                         f"{MAX_DEPTH} levels deep, or refer to themselves; a spec has a few hundred values"])
    problems: List[str] = []
    _duplicate_keys(root, "", problems, seen=set())
    if problems:
        raise SpecError(problems)


def _expanded_size(node: yaml.Node, sizes: Dict[int, Optional[float]], depth: int) -> float:
    """How many values `node` stands for with every alias expanded (infinite for a cycle or too deep).

    Memoised per node: an alias is the same node object as its anchor, so this stays linear in the file."""
    key = id(node)
    if key in sizes:
        cached = sizes[key]
        return float("inf") if cached is None else cached   # None: still being counted, so a cycle
    if depth > MAX_DEPTH:
        return float("inf")
    sizes[key] = None
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    else:
        children = []
    total = 1.0
    for child in children:
        total += _expanded_size(child, sizes, depth + 1)
        if total > MAX_VALUES:
            break
    sizes[key] = total
    return total


def _duplicate_keys(node: yaml.Node, path: str, problems: List[str], seen: set) -> None:
    if id(node) in seen:   # an aliased mapping is reported once, where it is defined
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _duplicate_keys(item, f"{path}[{index}]", problems, seen)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: Dict[tuple, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue   # a mapping or list as a key: the section parsers say it is not a known key
        line = key_node.start_mark.line + 1
        where = f"{path}.{key_node.value}" if path else key_node.value
        identity = (key_node.tag, key_node.value)
        if identity in first_line:
            problems.append(f"{where}: given twice (lines {first_line[identity]} and {line} of the spec file); YAML "
                            f"would keep only the last without a word, so remove one")
        else:
            first_line[identity] = line
        _duplicate_keys(value_node, where, problems, seen)
