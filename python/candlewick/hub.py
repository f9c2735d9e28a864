"""Hugging Face hub ids -> local paths, through huggingface_hub's cache (offline when cached, downloads otherwise).

    resolve("tests/data/gpt2-tiny")              # an existing path: used as it is
    resolve("openai-community/gpt2")             # a snapshot folder with the files a model needs
    resolve("org/name-GGUF:Q4_K_M")              # the .gguf file(s) whose name holds Q4_K_M -> the first one
    resolve("org/name-GGUF/model-q8_0.gguf")     # one file of a repository

huggingface_hub honours HF_HUB_OFFLINE, HF_HUB_CACHE / HF_HOME and HF_TOKEN, and shows a progress bar while it
downloads (HF_HUB_DISABLE_PROGRESS_BARS=1 hides it).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelLoadError

# What a checkpoint folder needs; weights in other formats (pickles, ONNX, GGUF ...) are not downloaded.
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/*",
]
TOKENIZER_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]

# "org/name", optionally followed by ":QUANT" (a GGUF quantisation) or "/path/inside/the/repo.gguf"
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?::(?P<quant>[A-Za-z0-9_.-]+)|/(?P<file>.+\.gguf))?$")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub id ("org/name", "org/name:QUANT" or "org/name/file.gguf")."""
    return bool(_HUB_ID.match(name))


def resolve(path_or_id: str | os.PathLike, *, allow_patterns: list[str] | None = None) -> str:
    """A local path for a checkpoint folder, a file or a hub id.

    An existing path is returned unchanged. A hub id is looked up in the huggingface_hub cache and downloaded
    when missing (unless HF_HUB_OFFLINE=1); `allow_patterns` chooses the files of a folder snapshot (default:
    MODEL_FILES). Raises ModelLoadError when the path does not exist and the id cannot be resolved."""
    name = os.fspath(path_or_id)
    if os.path.exists(name):
        return name
    m = _HUB_ID.match(name)
    if m is None:
        raise ModelLoadError(f"{name}: no such file or folder (and not a Hugging Face hub id like 'org/name')")
    repo = m["repo"]
    try:
        import huggingface_hub as hf

        if m["file"]:
            return hf.hf_hub_download(repo, m["file"])
        if m["quant"]:
            q = m["quant"]
            folder = hf.snapshot_download(repo, allow_patterns=[f"*{q}*.gguf", f"*{q.lower()}*.gguf",
                                                                f"*{q.upper()}*.gguf"])
            found = sorted(p for p in Path(folder).rglob("*.gguf") if q.lower() in p.name.lower())
            if not found:
                raise ModelLoadError(f"{repo}: no .gguf file with {q!r} in its name")
            return str(found[0])  # split files (-00001-of-0000N.gguf) start with the first shard
        folder = hf.snapshot_download(repo, allow_patterns=allow_patterns or MODEL_FILES)
    except ModelLoadError:
        raise
    except Exception as e:  # huggingface_hub's many error classes, mapped onto one clear message each
        raise ModelLoadError(_explain(name, repo, e)) from None
    if allow_patterns is None and not (Path(folder) / "config.json").is_file():
        ggufs = sorted(p.name for p in Path(folder).rglob("*.gguf"))
        raise ModelLoadError(f"{repo} has no config.json: not a transformers checkpoint. For a GGUF repository, "
                             f"name the file ('{repo}/model-Q4_K_M.gguf') or the quantisation ('{repo}:Q4_K_M')"
                             + (f"; cached: {', '.join(ggufs)}" if ggufs else ""))
    return folder


def _explain(name: str, repo: str, e: Exception) -> str:
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    kind = type(e).__name__
    if isinstance(e, hf_errors.GatedRepoError):
        return (f"{repo} is gated on the Hugging Face hub: accept its licence on https://huggingface.co/{repo} "
                "and log in with `hf auth login` (or set HF_TOKEN)")
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return (f"{name}: no such local file or folder, and no such model on the Hugging Face hub (or it is "
                "private: log in with `hf auth login` or set HF_TOKEN)")
    if isinstance(e, (hf_errors.LocalEntryNotFoundError, getattr(hf_errors, "IncompleteSnapshotError", ()))):
        why = ("HF_HUB_OFFLINE=1 forbids downloading it" if constants.HF_HUB_OFFLINE
               else "the hub could not be reached")
        return (f"{name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; download it "
                f"first with `hf download {repo}` while online (or pass a local folder)")
    if isinstance(e, (hf_errors.RevisionNotFoundError, hf_errors.EntryNotFoundError)):
        return f"{name}: not found on the Hugging Face hub ({kind})"
    if isinstance(e, hf_errors.HFValidationError):
        return f"{name}: not a valid Hugging Face hub id ({e})"
    return f"{name}: could not get it from the Hugging Face hub: {kind}: {e}"


__all__ = ["resolve", "is_hub_id", "MODEL_FILES", "TOKENIZER_FILES"]
