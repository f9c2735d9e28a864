"""Write tests/data/grads/: gradients of the mean next-token cross-entropy of each fixture, by torch autograd through
Hugging Face transformers in float64, and a few AdamW steps and a gradient clip by torch.optim, for
tests/test_train.py to hold `reference.load(path).loss_and_grads` and `candlewick.reference.train` to.

transformers keeps some steps in float32 even in a float64 model (eager softmax, RMSNorm, RoPE angles); they are
patched to float64 here as ../shared/tools/exact_reference.py does for the fixtures' logits, and a dispatch-mode
guard proves that no float32 tensor is made, forward or backward. The loss is computed here from the float64
logits (transformers' own loss function casts them to float32).

Each FIXTURE.npz holds `ids` (int64 [T], the fixture's prompt 0), `loss` (float64 []) and, for every parameter,
`grad:NAME` (float64, the checkpoint's tensor name). A tensor of more than 2048 numbers is kept at 2048 fixed
random positions only (`index:NAME`, flat indices, and `grad:NAME` the gradient there), to keep the files small.

usage: python scripts/make_grad_golden.py   (needs torch, transformers, numpy, safetensors; not the test suite)
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import types

import numpy as np
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA, OUT = ROOT / "tests" / "data", ROOT / "tests" / "data" / "grads"
FIXTURES = ["gpt2-tiny", "llama-tiny", "qwen2-tiny", "qwen3-tiny", "mistral-sw-tiny", "smollm3-tiny",
            "llama3-rope-tiny"]
KEEP = 2048

_softmax = torch.nn.functional.softmax


def softmax64(x, dim=None, _stacklevel=3, dtype=None):
    return _softmax(x, dim=dim) if x.dtype == torch.float64 else _softmax(x, dim=dim, dtype=dtype)


def rms_forward(self, x):
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@contextlib.contextmanager
def float32_means_float64():
    saved = torch.float
    torch.float = torch.float64
    try:
        yield
    finally:
        torch.float = saved


def exact_rope(module, cfg):
    rope_type = module.rope_type
    fn = module.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
    with float32_means_float64():
        inv, scale = fn(cfg, device=None)
    assert inv.dtype == torch.float64

    def forward(self, x, position_ids, layer_type=None):
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), -1)
        return (emb.cos() * float(scale)).to(x.dtype), (emb.sin() * float(scale)).to(x.dtype)

    module.forward = types.MethodType(forward, module)


class NoFloat32(TorchDispatchMode):
    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16):
                raise RuntimeError(f"{func} produced {t.dtype}")
        return out


def exact_model(path: pathlib.Path):
    torch.nn.functional.softmax = softmax64
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64,
                                                              attn_implementation="eager")
    model.train(False)  # no dropout (the same as eval(): the forward is deterministic)
    for m in model.modules():
        name = type(m).__name__
        if name.endswith("RMSNorm"):
            m.forward = types.MethodType(rms_forward, m)
        if name.endswith("RotaryEmbedding"):
            exact_rope(m, getattr(m, "config", None) or model.config)
    return model


def file_names(path: pathlib.Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "np") as f:
        return set(f.keys())


def golden(name: str) -> None:
    path = DATA / name
    ids = np.load(path / "reference.npz")["prompt0_ids"].astype(np.int64)
    model = exact_model(path)
    with NoFloat32():
        logits = model(torch.tensor(ids[None])).logits[0]                     # [T, V] float64
        loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
        loss.backward()
    names, out = file_names(path), {"ids": ids, "loss": np.float64(loss.item())}
    rng = np.random.default_rng(0)
    for pname, p in model.named_parameters():  # tied weights appear once, with the sum of both uses
        assert pname in names, f"{name}: parameter {pname} is not a tensor of the file"
        g = p.grad.numpy().astype(np.float64)
        if g.size > KEEP:
            index = np.sort(rng.choice(g.size, KEEP, replace=False)).astype(np.int32)
            out[f"index:{pname}"], g = index, g.reshape(-1)[index]
        out[f"grad:{pname}"] = g
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / f"{name}.npz", **out)
    print(f"{name}: loss {loss.item():.6f}, {sum(1 for k in out if k.startswith('grad:'))} gradients, "
          f"{(OUT / f'{name}.npz').stat().st_size / 1024:.0f} KiB")


def optimizer_golden() -> None:
    """Three AdamW steps (a matrix with weight decay, a vector without) with a linear warm-up and the gradients
    clipped to a global norm of 1 before each step, as reference.train does them."""
    rng = np.random.default_rng(1)
    w0, b0 = rng.normal(size=(3, 4)), rng.normal(size=4)
    grads = [(rng.normal(size=(3, 4)) * 2, rng.normal(size=4) * 2) for _ in range(3)]
    w, b = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                            lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    lrs, norms = [0.01 * (s + 1) / 3 for s in range(3)], []
    for lr, (gw, gb) in zip(lrs, grads):
        for group in opt.param_groups:
            group["lr"] = lr
        w.grad, b.grad = torch.tensor(gw), torch.tensor(gb)
        norms.append(float(torch.nn.utils.clip_grad_norm_([w, b], 1.0)))
        opt.step()
    np.savez_compressed(OUT / "adamw.npz", w0=w0, b0=b0, gw=np.stack([g[0] for g in grads]),
                        gb=np.stack([g[1] for g in grads]), lr=np.array(lrs), norms=np.array(norms),
                        w=w.detach().numpy(), b=b.detach().numpy())
    print(f"adamw: norms before clipping {np.round(norms, 4).tolist()}")


if __name__ == "__main__":
    torch.manual_seed(0)
    for fixture in FIXTURES:
        golden(fixture)
    optimizer_golden()
    (OUT / "README.md").write_text(
        "# Golden gradients\n\nWritten by `scripts/make_grad_golden.py` (torch " + torch.__version__
        + ", transformers " + transformers.__version__ + ", float64 throughout); read by tests/test_train.py.\n"
        "`FIXTURE.npz`: `ids`, `loss` and `grad:NAME` for every parameter of ../FIXTURE (`index:NAME` when only "
        "some positions are kept); `adamw.npz`: three AdamW steps with clipping.\n", encoding="utf-8")
    print(json.dumps(FIXTURES))
