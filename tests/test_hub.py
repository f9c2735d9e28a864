"""Hub ids through huggingface_hub's cache: a cache laid out as huggingface_hub writes it (blobs, snapshots of
symlinks, refs/main) is built in a temporary folder from the fixtures, and read with HF_HUB_OFFLINE=1."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest

import candlewick as cw
from candlewick import hub
from conftest import DATA

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Put `files` (name in the repo -> file) into `cache` as huggingface_hub does; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A hub cache holding openai-community/gpt2 (the gpt2-tiny fixture) and a GGUF repository, used offline."""
    cache = tmp_path / "hub"
    add_repo(cache, "openai-community/gpt2",
             {name: DATA / "gpt2-tiny" / name for name in ("config.json", "model.safetensors", "tokenizer.json")})
    add_repo(cache, "someone/tiny-GGUF", {"tiny-Q8_0.gguf": DATA / "gpt2-tiny" / "config.json",
                                          "tiny-Q4_K_M.gguf": DATA / "gpt2-tiny" / "config.json"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_loads_from_the_cache_offline(cache):
    model = cw.load("openai-community/gpt2")
    local = cw.load(DATA / "gpt2-tiny")
    ids = local.tokenizer.encode("Hello, candlewick!")
    np.testing.assert_array_equal(model.logits(ids), local.logits(ids))
    assert hub.resolve("openai-community/gpt2") == str(cache / "models--openai-community--gpt2" / "snapshots" / COMMIT)
    tok = cw.Tokenizer.from_pretrained("openai-community/gpt2")
    assert tok.encode("Hello world") == local.tokenizer.encode("Hello world")


def test_gguf_files_by_quantisation_or_name(cache):
    snapshot = cache / "models--someone--tiny-GGUF" / "snapshots" / COMMIT
    assert hub.resolve("someone/tiny-GGUF:Q4_K_M") == str(snapshot / "tiny-Q4_K_M.gguf")
    assert hub.resolve("someone/tiny-GGUF:q8_0") == str(snapshot / "tiny-Q8_0.gguf")
    assert Path(hub.resolve("someone/tiny-GGUF/tiny-Q8_0.gguf")).resolve() == (snapshot / "tiny-Q8_0.gguf").resolve()
    with pytest.raises(cw.ModelLoadError, match="Q2_K"):
        hub.resolve("someone/tiny-GGUF:Q2_K")
    with pytest.raises(cw.ModelLoadError, match=r"no config.json.*someone/tiny-GGUF:Q4_K_M.*tiny-Q4_K_M.gguf"):
        cw.load("someone/tiny-GGUF")


def test_uncached_id_offline_is_a_clear_error(cache):
    with pytest.raises(cw.ModelLoadError) as e:
        cw.load("openai-community/gpt2-xl")
    message = str(e.value)
    assert "openai-community/gpt2-xl is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message and "hf download openai-community/gpt2-xl" in message
    with pytest.raises(cw.ModelLoadError, match="not in the Hugging Face cache"):
        cw.Tokenizer.from_pretrained("openai-community/gpt2-xl")


def test_local_paths_are_used_as_they_are(tmp_path):
    assert hub.resolve(DATA / "gpt2-tiny") == str(DATA / "gpt2-tiny")
    with pytest.raises(cw.ModelLoadError, match="no such file or folder"):
        hub.resolve(tmp_path / "missing" / "deeper" / "folder")
    assert hub.is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and hub.is_hub_id("org/name-GGUF:Q4_K_M")
    assert not hub.is_hub_id("/abs/path") and not hub.is_hub_id("a/b/c")


def test_cli_with_hub_id_and_environment_variables(tmp_path):
    cache = tmp_path / "hub"
    add_repo(cache, "openai-community/gpt2",
             {name: DATA / "gpt2-tiny" / name for name in ("config.json", "model.safetensors", "tokenizer.json")})
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    cmd = [sys.executable, "-m", "candlewick.cli", "generate", "openai-community/gpt2", "Hello", "-t", "0",
           "--max-tokens", "6"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == cw.load(DATA / "gpt2-tiny").generate("Hello", max_new_tokens=6, temperature=0).text + "\n"
    p = subprocess.run(cmd[:4] + ["openai-community/gpt2-xl", "Hello"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"candlewick generate: error: openai-community/gpt2-xl is not in the Hugging Face cache ({cache}) and "
        "HF_HUB_OFFLINE=1 forbids downloading it; download it first with `hf download openai-community/gpt2-xl` "
        "while online (or pass a local folder)"]
