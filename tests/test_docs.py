"""Every code block of README.md and docs/*.md runs, or says why it does not (issue 29.3).

A fenced block is classified by the HTML comment on the line before it (blank lines allowed):

- no comment, ``python``: run here, in process, with ``pst.load_default_prior`` replaced by one
  shared tiny random Llama (the default model takes ~30 s to load; what these runs check is that
  the code runs, not what the model says);
- no comment, ``bash``: every line is a ``posterior ...`` command, run here in a scratch folder
  through ``posterior.cli.main`` at toy sizes (see ``toy_argv``: the tiny model, and -n,
  --max-new-tokens, --steps, --batch-size, --smc-n capped);
- ``<!-- slow: WHY -->`` (python): runs only in the slow tier, as written, on the default model
  (one instance shared by every such block);
- ``<!-- output -->``: the exact stdout of the fast python block before it (checked, after
  stripping trailing spaces); ``<!-- output, not checked: WHY -->``: the output of the python or
  bash block before it, shown but not compared;
- ``<!-- not run: WHY -->``: not run, for the reason given.

docs/API.md is the public contract and is not edited here: its blocks are signature listings (a
call with ``path``, ``**kw`` or ``...`` in it), counted as not run. ``mkdocs build --strict``
runs here when mkdocs is installed (the ``[docs]`` extra) and in CI (.ci/run).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
CONTRACT = ROOT / "docs" / "API.md"  # not edited here; its blocks are listings
MARKER = re.compile(r"^<!--\s*(not run|slow|output, not checked|output)\s*(?::\s*(.*?))?\s*-->$")
FENCE = re.compile(r"^```([\w-]*)\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # line of the opening fence (1-based)
    lang: str
    code: str
    marker: str | None  # "not run" | "slow" | "output" | "output, not checked" | None
    reason: str
    comment: str  # the HTML comment before the block, verbatim ("" if none)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def parse(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown page with the marker comment before each."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        assert j < len(lines), f"{path.name}:{i + 1}: a code block is never closed"
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        comment = lines[k].strip() if k >= 0 and lines[k].strip().startswith("<!--") else ""
        mk = MARKER.match(comment) if comment else None
        blocks.append(Block(str(path.relative_to(ROOT)), i + 1, m.group(1), "\n".join(lines[i + 1:j]),
                            mk.group(1) if mk else None, (mk.group(2) or "") if mk else "", comment))
        i = j + 1
    return blocks


ALL = [b for page in PAGES for b in parse(page)]
DOCS = [b for b in ALL if b.page != str(CONTRACT.relative_to(ROOT))]


def commands(block: Block) -> list[str]:
    """The block's command lines, with backslash continuations joined and comments dropped."""
    joined = block.code.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def following_output(block: Block) -> Block | None:
    """The output block right after ``block`` on its page, if there is one."""
    blocks = [b for b in DOCS if b.page == block.page]
    i = blocks.index(block)
    if i + 1 < len(blocks) and blocks[i + 1].marker in ("output", "output, not checked"):
        return blocks[i + 1]
    return None


FAST_PY = [b for b in DOCS if b.lang == "python" and b.marker is None]
SLOW_PY = [b for b in DOCS if b.lang == "python" and b.marker == "slow"]
SHELL = [b for b in DOCS if b.lang == "bash" and b.marker is None]


def test_every_block_runs_or_says_why():
    problems = []
    for b in DOCS:
        where = f"{b.id} ({b.lang or 'no language'})"
        if b.comment and not b.marker:
            problems.append(f"{where}: unknown marker {b.comment!r}")
        elif b.marker in ("not run", "slow", "output, not checked") and len(b.reason) < 10:
            problems.append(f"{where}: '{b.marker}' needs a reason")
        elif b.marker == "slow" and b.lang != "python":
            problems.append(f"{where}: only python blocks can be slow")
        elif b.marker in ("output", "output, not checked"):
            blocks = [x for x in DOCS if x.page == b.page]
            before = blocks[blocks.index(b) - 1] if blocks.index(b) else None
            if before is None or before.lang not in ("python", "bash") or before.marker not in (None, "slow"):
                problems.append(f"{where}: an output block must follow a python or bash block that runs")
            if b.marker == "output" and (before is None or before.lang != "python" or before.marker == "slow"):
                problems.append(f"{where}: a checked output must follow a fast python block")
        elif b.marker is None and b.lang == "bash":
            bad = [c for c in commands(b) if not c.startswith("posterior ")]
            if bad:
                problems.append(f"{where}: runs only `posterior ...` commands; mark it not run: {bad[0]!r}")
        elif b.marker is None and b.lang != "python":
            problems.append(f"{where}: neither python nor bash; mark it not run or as output")
    assert not problems, "\n".join(problems)


def test_the_contract_is_listings_only():
    """docs/API.md is not edited here: its blocks are the contract's signatures, not programs."""
    blocks = parse(CONTRACT)
    assert blocks and all(b.lang in ("python", "") for b in blocks)
    listings = [b for b in blocks if re.search(r"\bpath\b|\*\*\w+|\.\.\.", b.code)]
    commands_only = [b for b in blocks if b.lang == "" and all(c.startswith("posterior ") for c in commands(b))]
    assert all(b in listings or b in commands_only for b in blocks), "a runnable block in API.md: run it from another page"


def test_counts_of_run_and_not_run_blocks():
    """The split the report quotes; a test that fails when a page loses all its runnable blocks."""
    counts = {m: sum(b.marker == m for b in DOCS) for m in ("not run", "slow", "output", "output, not checked")}
    counts["fast python"], counts["shell"] = len(FAST_PY), len(SHELL)
    print(counts)
    assert counts["fast python"] >= 8 and counts["shell"] >= 5 and counts["output"] >= 4


# --- running the python blocks ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_prior():
    from posterior.testing import tiny_hf_prior

    return tiny_hf_prior("llama")


def run_python(code: str, monkeypatch, load) -> str:
    import posterior as pst

    monkeypatch.setattr(pst, "load_default_prior", load)
    from posterior.samplers.registry import SAMPLERS
    from posterior.samplers.options import OPTIONS as BUILTIN

    threads, methods = torch.get_num_threads(), dict(SAMPLERS)  # a block may register a method: undone after
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            # As a script runs: its own module in sys.modules (dataclasses look a class's module up
            # there) and none of this file's __future__ flags (dont_inherit).
            module = types.ModuleType("__docs__")
            monkeypatch.setitem(sys.modules, "__docs__", module)
            exec(compile(code, "<docs block>", "exec", dont_inherit=True), module.__dict__)
    finally:
        torch.set_num_threads(threads)
        for name in set(SAMPLERS) - set(methods) - set(BUILTIN):  # built-ins stay (they load once)
            del SAMPLERS[name]
    return out.getvalue()


def strip(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


@pytest.mark.parametrize("block", FAST_PY, ids=[b.id for b in FAST_PY])
def test_python_block_runs(block, tiny_prior, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    out = run_python(block.code, monkeypatch, lambda **kw: tiny_prior)
    shown = following_output(block)
    if shown is not None and shown.marker == "output":
        assert strip(out) == strip(shown.code), f"{block.id}: the output shown at {shown.id} is not what it prints"


@pytest.fixture(scope="module")
def default_prior():
    import posterior as pst

    return pst.load_default_prior()


@pytest.mark.slow
@pytest.mark.parametrize("block", SLOW_PY, ids=[b.id for b in SLOW_PY])
def test_slow_python_block_runs_on_the_default_model(block, default_prior, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert run_python(block.code, monkeypatch, lambda **kw: default_prior)


# --- running the shell blocks ------------------------------------------------------------------

CAPS = {"-n": 4, "--max-new-tokens": 4, "--steps": 2, "--batch-size": 2, "--smc-n": 2}


def toy_argv(command: str, model: str) -> list[str]:
    """``posterior ...`` as argv at toy sizes: the tiny model unless a model or backend is named,
    and the sizes in CAPS capped."""
    argv = shlex.split(command, comments=True)[1:]
    for i, a in enumerate(argv[:-1]):
        if a in CAPS:
            argv[i + 1] = str(min(int(argv[i + 1]), CAPS[a]))
    if "--help" not in argv and "--model" not in argv and "--backend" not in argv:
        argv += ["--model", model]
    return argv


def test_toy_argv_caps_sizes_and_adds_the_tiny_model():
    argv = toy_argv('posterior sample "The movie was" -n 32 --max-new-tokens 2 --json  # note', "M")
    assert argv == ["sample", "The movie was", "-n", "4", "--max-new-tokens", "2", "--json", "--model", "M"]
    assert toy_argv("posterior sample --help", "M") == ["sample", "--help"]


@pytest.mark.parametrize("block", SHELL, ids=[b.id for b in SHELL])
def test_shell_block_runs_at_toy_size(block, model_dir, monkeypatch, tmp_path, capsys):
    from posterior.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POSTERIOR_THREADS", "1")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "good day"}\n')
    (tmp_path / "prompts.txt").write_text("hello\ngood day\n")
    threads = torch.get_num_threads()
    try:
        for command in commands(block):
            argv = toy_argv(command, model_dir)
            try:
                code = main(argv)
            except SystemExit as e:  # --help
                code = e.code
            err = capsys.readouterr().err
            assert code == 0, f"{block.id}: posterior {shlex.join(argv)} exited {code}:\n{err[-2000:]}"
    finally:
        torch.set_num_threads(threads)


# --- the README -----------------------------------------------------------------------------


def test_readme_is_at_most_300_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_readme_install_steps_are_what_ci_runs():
    """The README's test command is .ci/run's sequence: every step of it is a line of .ci/run."""
    readme = next(b for b in parse(ROOT / "README.md") if "pytest" in b.code and "pip install" in b.code)
    ci = [set(shlex.split(line, comments=True)) - {"-q", "python3", "-m", "\\"}
          for line in (ROOT / ".ci" / "run").read_text().replace("\\\n", " ").splitlines()]
    for step in readme.code.split("&&"):
        words = set(shlex.split(step)) - {"python", "-m", "-q"}
        assert any(words <= line for line in ci), f"README step not in .ci/run: {step.strip()!r}"


def slug(heading: str) -> str:
    """Python-Markdown's toc slug (the anchors mkdocs makes)."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def test_readme_links_resolve():
    """mkdocs --strict checks the site's links; the README is not part of the site, so here."""
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("http"):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path
        assert file.exists(), f"README links to {target}, which does not exist"
        if anchor:
            headings = [slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)]
            assert anchor in headings, f"README links to {target}: no heading with that anchor"


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_mkdocs_build_is_strict_clean(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists() and (tmp_path / "site" / "reference" / "index.html").exists()
