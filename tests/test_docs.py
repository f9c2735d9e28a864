"""The python blocks of docs/reference.md run, in order, in one namespace, from the repository root."""
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def run_page(page: str, monkeypatch, min_blocks: int) -> dict:
    """Run the python blocks of docs/`page`, in order, in one namespace, from the repository root."""
    blocks = BLOCK.findall((ROOT / "docs" / page).read_text(encoding="utf-8"))
    assert len(blocks) >= min_blocks
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    for n, code in enumerate(blocks):
        exec(compile(code, f"docs/{page}: python block {n + 1}", "exec"), namespace)
    return namespace


def test_reference_page_examples_run(monkeypatch, capsys):
    namespace = run_page("reference.md", monkeypatch, 8)
    assert "4 2" in capsys.readouterr().out
    assert namespace["logits"].shape[0] == len(namespace["ids"])


def test_readme_python_example_runs(monkeypatch, capsys):
    """The README's first python block (the API tour) runs as written, and its claim about the engine holds."""
    blocks = BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md: python block 1", "exec"), namespace)
    assert "llama 256" in capsys.readouterr().out
    assert abs(namespace["exact"] - namespace["logits"]).max() < 1e-4
    assert namespace["c"].usage.completion_tokens == 16


def test_structured_page_examples_run(monkeypatch, capsys):
    """docs/structured.md's python blocks (the Python API; its ```py blocks need a server, and tests/test_tools.py
    makes the same calls)."""
    run_page("structured.md", monkeypatch, 3)
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(" stop") and out.splitlines()[1].startswith("call ")


def run_doctest_page(page: str, monkeypatch) -> "doctest.TestResults":
    """The >>> examples of docs/`page` as one doctest, from the repository root. A markdown fence closing a block
    ends the expected output before it, as a blank line does."""
    import doctest

    monkeypatch.chdir(ROOT)
    text = re.sub(r"^```\w*$", "", (ROOT / "docs" / page).read_text(encoding="utf-8"), flags=re.M)
    test = doctest.DocTestParser().get_doctest(text, {}, page, f"docs/{page}", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    return runner.summarize(verbose=False)


def test_tutorial_runs_as_a_doctest(monkeypatch):
    """docs/tutorial.md, the whole path from a text to a trained model in the engine: every >>> example runs, in
    order, and prints what the page says it prints."""
    result = run_doctest_page("tutorial.md", monkeypatch)
    assert result.attempted >= 60 and result.failed == 0, result
