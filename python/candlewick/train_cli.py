"""`candlewick train` (pretrain or fine-tune in the NumPy reference) and `candlewick eval` (perplexity beside n-gram
baselines): the commands, and the checkpoint folder they write and read."""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidArgument

SPECIAL = "<|endoftext|>"  # id 0 of a trained tokenizer: the end (and start) of a text
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


# -- the tokenizer ------------------------------------------------------------------------------------------------


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2's scheme: every byte is a token to start with, so any text encodes) trained
    by the `tokenizers` library on `text`, with <|endoftext|> as token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    return tok


def write_tokenizer(tok, folder: Path, context: int) -> None:
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL, "eos_token": SPECIAL,
              "unk_token": SPECIAL, "model_max_length": context, "add_prefix_space": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def encode_text(tokenizer_json: Path, text: str) -> np.ndarray:
    """The text as one stream of ids, no special tokens (the `tokenizers` library: the same file the engine
    reads)."""
    from tokenizers import Tokenizer

    return np.asarray(Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids,
                      dtype=np.int64)


# -- what the folder holds ----------------------------------------------------------------------------------------


def write_metrics(history, path: Path) -> None:
    """metrics.csv: step,train_loss,val_loss (empty where a step has no such figure)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["step", "train_loss", "val_loss"])
        for row in history:
            w.writerow([row.step, "" if row.train_loss is None else f"{row.train_loss:.6f}",
                        "" if row.val_loss is None else f"{row.val_loss:.6f}"])


def read_metrics(path) -> list[dict[str, Any]]:
    """metrics.csv back as rows {step: int, train_loss: float | None, val_loss: float | None}."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{"step": int(r["step"]), "train_loss": float(r["train_loss"]) if r["train_loss"] else None,
                 "val_loss": float(r["val_loss"]) if r["val_loss"] else None} for r in csv.DictReader(f)]


def plot_losses(history, path: Path, title: str) -> None:
    """loss.png: the training loss of every batch (and its running mean over 25 steps) and the validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r.step for r in history if r.train_loss is not None])
    train = np.array([r.train_loss for r in history if r.train_loss is not None])
    val = [(r.step, r.val_loss) for r in history if r.val_loss is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if len(train):
        ax.plot(steps, train, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (batch)")
        k = min(25, len(train))
        smooth = np.convolve(train, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="tab:blue", label=f"train (mean of {k})")
    ax.plot([s for s, _ in val], [v for _, v in val], "o-", color="tab:orange", markersize=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- candlewick train ---------------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> None:
    from . import reference
    from .cli import _progress, _resolve_model
    from .reference import train as T

    out, data = Path(args.out), Path(args.data)
    try:
        text = data.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidArgument(f"--data: cannot read {data}: {e.strerror}") from None
    if not text.strip():
        raise InvalidArgument(f"--data: {data} is empty")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise InvalidArgument(f"{out} exists and is not empty (--force writes over it)")
    out.mkdir(parents=True, exist_ok=True)

    if args.from_ckpt:  # fine-tuning: the checkpoint's config, tokenizer and weights
        source = Path(_resolve_model(args.from_ckpt))
        if not source.is_dir():
            raise InvalidArgument(f"--from: {args.from_ckpt} is not a checkpoint folder (safetensors)")
        for name in ("config.json",) + TOKENIZER_FILES:
            if (source / name).is_file() and source.resolve() != out.resolve():
                shutil.copyfile(source / name, out / name)
        lr = 3e-4 if args.lr is None else args.lr
    else:
        if args.arch not in ("gpt2", "llama"):
            raise InvalidArgument(f"--arch must be gpt2 or llama, not {args.arch!r}")
        write_tokenizer(train_tokenizer(text, args.vocab_size), out, args.context)
        vocab = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
        config = T.new_config(args.arch, len(vocab), n_layer=args.layers, n_embd=args.dim, n_head=args.heads,
                              n_kv_head=args.kv_heads, context=args.context)
        T.new_checkpoint(out, config, out / "tokenizer.json", seed=args.seed)
        lr = 3e-3 if args.lr is None else args.lr

    model = reference.load(source if args.from_ckpt else out)
    if not isinstance(model, reference.CausalLM):
        raise InvalidArgument(f"--from: {args.from_ckpt} is an encoder; only language models train here")
    block = min(args.block_size or model.config.context_length, model.config.context_length)
    ids = encode_text(out / "tokenizer.json", text)
    train_ids, val_ids = T.split_train_val(ids, args.val_fraction)
    if len(train_ids) < block + 1 or len(val_ids) < block + 1:
        raise InvalidArgument(f"{data}: {len(ids)} tokens is too short for windows of {block + 1} tokens in both "
                              f"the training part and the validation tail (--block-size, --val-fraction)")
    settings = T.TrainConfig(steps=args.steps, batch_size=args.batch_size, block_size=block, lr=lr, min_lr=lr / 10,
                             warmup=min(args.warmup, args.steps // 10 + 1), eval_every=args.eval_every)
    n_params = sum(v.size for v in model.tensors.values())
    what = f"fine-tuning {args.from_ckpt}" if args.from_ckpt else f"{model.config.architecture} from scratch"
    print(f"{what}: {n_params:,} parameters, {len(train_ids):,} training and {len(val_ids):,} validation tokens, "
          f"{settings.steps} steps of {settings.batch_size} x {block} tokens", file=sys.stderr)

    bar = _progress(total=settings.steps, desc="train", unit="step")
    last_val: list[float] = []

    def on_step(row) -> None:
        if row.val_loss is not None:
            last_val.append(row.val_loss)
        if row.step:
            bar.update()
            bar.set_postfix(loss=f"{row.train_loss:.3f}", val=f"{last_val[-1]:.3f}", tok_s=f"{row.tokens_per_s:.0f}")
        if bar.disable and row.val_loss is not None:  # no terminal, no bar: a line per evaluation instead
            print(f"step {row.step}/{settings.steps}: validation loss {row.val_loss:.4f}"
                  + (f", train loss {row.train_loss:.4f}, {row.tokens_per_s:.0f} tokens/s" if row.step else ""),
                  file=sys.stderr, flush=True)

    start = time.perf_counter()
    history = T.train(model, train_ids, val_ids, settings, seed=args.seed, on_step=on_step,
                      threads=args.threads or None)
    seconds = time.perf_counter() - start
    bar.close()

    T.save_checkpoint(model, out)
    write_metrics(history, out / "metrics.csv")
    plot_losses(history, out / "loss.png", f"{out.name}: {what}, {n_params:,} parameters, seed {args.seed}")
    tokens = settings.steps * settings.batch_size * block
    summary = {"data": str(data), "from": args.from_ckpt, "arch": model.config.raw["model_type"],
               "parameters": n_params,
               "seed": args.seed, "steps": settings.steps, "batch_size": settings.batch_size, "block_size": block,
               "lr": lr, "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
               "val_loss_before": history[0].val_loss, "val_loss_after": history[-1].val_loss,
               "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1)}
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    before, after = float(history[0].val_loss or 0.0), float(history[-1].val_loss or 0.0)
    print(f"validation loss {history[0].val_loss:.4f} -> {history[-1].val_loss:.4f} (perplexity "
          f"{math.exp(before):.1f} -> {math.exp(after):.1f}) in {seconds:.1f} s, "
          f"{tokens / seconds:.0f} training tokens/s; wrote {out}")


# -- candlewick eval ----------------------------------------------------------------------------------------------


def _cmd_eval(args: argparse.Namespace) -> None:
    from .cli import _load_path, _model_name, _resolve_model
    from .evaluate import NGramLM

    path = _resolve_model(args.model)
    model = _load_path(path, args)
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidArgument(f"cannot read {args.file}: {e.strerror}") from None
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if args.ngram_data:
        fit_ids = model.tokenizer.encode(Path(args.ngram_data).read_text(encoding="utf-8"), add_special_tokens=False)
        scored, where = ids, f"all of {args.file}"
    else:  # the held-out tail, as `candlewick train` keeps it: the n-gram models learn from the rest
        n_val = max(int(len(ids) * args.val_fraction), 2)
        fit_ids, scored = ids[:-n_val], ids[-n_val:]
        where = f"the last {args.val_fraction:.0%} of {args.file} (the n-grams are fitted on the rest)"
    if len(scored) < 2:
        raise InvalidArgument(f"{args.file}: fewer than two tokens to score")
    vocab = model.config["vocab_size"]
    rows = [(f"{_model_name(args.model)} ({model.config['architecture']})", model.perplexity(scored))]
    for order in args.orders:
        for smoothing in ("kneser-ney", "add-k"):
            lm = NGramLM(order, smoothing=smoothing, k=args.k, vocab_size=vocab).fit(fit_ids)
            label = f"{order}-gram, " + ("Kneser-Ney" if smoothing == "kneser-ney" else f"add-{args.k:g}")
            rows.append((label, lm.perplexity(scored)))
    if args.json:
        print(json.dumps({"tokens": len(scored), "scored": where, "perplexity": dict(rows)}))
        return
    print(f"{len(scored):,} tokens: {where}")
    width = max(len(name) for name, _ in rows)
    print(f"{'model':<{width}}  perplexity")
    for name, ppl in rows:
        print(f"{name:<{width}}  {ppl:10.2f}")


# -- the parsers --------------------------------------------------------------------------------------------------


def add_commands(sub, load_options: argparse.ArgumentParser, model_help: str) -> None:
    """Register `train` and `eval` on the `candlewick` parser's subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "train", help="pretrain or fine-tune a small model in the NumPy reference", formatter_class=fmt,
        description="Train a language model with the NumPy reference (float64, AdamW, warm-up and cosine decay, "
                    "gradient clipping) on a UTF-8 text. From scratch, a byte-level BPE tokenizer is trained on the "
                    "text first; with --from, an existing checkpoint is fine-tuned with its own tokenizer. The last "
                    "--val-fraction of the text is held out as the validation set. OUT receives config.json, "
                    "model.safetensors, tokenizer.json (loadable by candlewick.load and candlewick.reference.load), "
                    "metrics.csv (step,train_loss,val_loss), loss.png and training.json; OUT is then the MODEL of "
                    "every other command (generate, eval, serve, ...).",
        epilog="examples:\n  candlewick train demo/genesis-gpt2 --data demo/genesis.txt --steps 1500 --seed 0\n"
               "  candlewick train /tmp/tiny --data README.md --arch llama --dim 64 --layers 2 --steps 200\n"
               "  candlewick train /tmp/exodus --from demo/genesis-gpt2 --data exodus.txt --steps 100",
    )
    p.add_argument("out", metavar="OUT", help="the folder to write the checkpoint into")
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text to train on")
    p.add_argument("--from", dest="from_ckpt", metavar="CKPT", default=None,
                   help="fine-tune this checkpoint (a GPT-2 or Llama-family folder) instead of starting afresh")
    p.add_argument("--arch", default="gpt2", help="gpt2 or llama, for a model from scratch (default: gpt2)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="weights and batches come from this seed (default: 0)")
    g = p.add_argument_group("a model from scratch")
    g.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary (default: 1024)")
    g.add_argument("--layers", type=int, default=4, help="Transformer blocks (default: 4)")
    g.add_argument("--dim", type=int, default=96, help="channels C (default: 96)")
    g.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    g.add_argument("--kv-heads", type=int, default=None, help="llama: key/value heads (default: --heads)")
    g.add_argument("--context", type=int, default=128, help="positions the model can see (default: 128)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=8, help="windows per step (default: 8)")
    g.add_argument("--block-size", type=int, default=None,
                   help="tokens per window (default: the context, so that every position is trained)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-3; 3e-4 with --from)")
    g.add_argument("--warmup", type=int, default=50, help="warm-up steps (default: 50, at most a tenth of the run)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="held-out tail of the text (default: 0.1)")
    g.add_argument("--eval-every", type=int, default=50, help="steps between validation losses (default: 50)")
    g.add_argument("--threads", type=int, default=1,
                   help="BLAS threads (default: 1, fastest for small models; 0 leaves NumPy's default)")
    p.add_argument("--force", action="store_true", help="write into OUT even if it holds files")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval", parents=[load_options], help="perplexity of a model beside n-gram baselines", formatter_class=fmt,
        description="Print MODEL's perplexity on a text beside n-gram language models (Kneser-Ney and add-k "
                    "smoothing) over the same tokens. By default the text's last --val-fraction is scored and the "
                    "n-grams are fitted on the rest (the split `candlewick train` makes); --ngram-data fits them on "
                    "another file and scores all of FILE.",
        epilog="example:\n  candlewick eval demo/genesis-gpt2 demo/genesis.txt",
    )
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("file", metavar="FILE", help="UTF-8 text to score")
    p.add_argument("--ngram-data", metavar="FILE", default=None, help="fit the n-gram models on this text instead")
    p.add_argument("--val-fraction", type=float, default=0.1, help="the scored tail of FILE (default: 0.1)")
    p.add_argument("--orders", type=lambda s: [int(x) for x in s.split(",") if x], default=[2, 3],
                   metavar="N[,N...]", help="n-gram orders (default: 2,3)")
    p.add_argument("-k", type=float, default=0.1, help="the k of add-k smoothing (default: 0.1)")
    p.add_argument("--json", action="store_true", help="print {tokens, scored, perplexity: {name: value}}")
    p.set_defaults(func=_cmd_eval)
