"""The package's floors (.ci/floors.py): no import goes up a floor, and no two modules import each
other, counting imports inside functions too."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "floors.py"


def run(root: Path) -> tuple[int, list[str]]:
    out = subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, timeout=60)
    assert out.stderr == "", out.stderr
    return out.returncode, out.stdout.splitlines()


def test_floors_script_reports_nothing():
    rc, lines = run(ROOT)
    assert lines == ["floors: 0 up-import(s), 0 circle(s)"] and rc == 0, "\n".join(lines)


def test_floors_script_finds_an_up_import_inside_a_function_and_a_circle(tmp_path):
    """The script is not vacuous: a deferred import of a sampler from a prior, and two modules
    importing each other, are both reported (and exit 1)."""
    pkg = tmp_path / "posterior"
    for sub in ("priors", "samplers"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "priors" / "a.py").write_text("def f():\n    from posterior.samplers import b\n")
    (pkg / "samplers" / "b.py").write_text("from posterior.samplers.c import x\n")
    (pkg / "samplers" / "c.py").write_text("from . import b\nx = 1\n")
    rc, lines = run(tmp_path)
    assert rc == 1
    assert lines == [
        "up: posterior/priors/a.py:2: posterior.priors.a (priors) imports posterior.samplers.b (samplers)",
        "circle: posterior.samplers.b <-> posterior.samplers.c",
        "floors: 1 up-import(s), 1 circle(s)",
    ]


def test_enumerable_is_one_answer_and_support_size_is_exact_on_a_full_support_toy():
    """``posterior.exact.enumerable`` answers "can this prior be enumerated" for compare and
    overoptimization: step-wise and small; support_size counts a full-support toy exactly."""
    from posterior.exact import enumerable, enumerate_continuations, support_size
    from posterior.testing import SequencePrior, markov_prior

    prior = markov_prior()
    for T in (1, 2, 3):
        seqs, _ = enumerate_continuations(prior, T)
        assert support_size(prior, T) == len(seqs)
    assert enumerable(prior, 3, limit=support_size(prior, 3))
    assert not enumerable(prior, 3, limit=support_size(prior, 3) - 1)
    assert not enumerable(SequencePrior(prior), 1)  # no next-token distributions


def test_moved_checks_keep_their_old_names():
    """_check_prompts / _check_seed moved to posterior.validate (public); posterior.posterior keeps
    the old names, and pst.bounds is the runner above the samplers."""
    import posterior as pst
    from posterior import validate
    from posterior.posterior import _check_prompts, _check_seed

    assert _check_prompts(["a", "b"]) == validate.check_prompts(["a", "b"]) == ["a", "b"]
    assert validate.check_prompts("a") == ["a"] and validate.check_prompts(None) is None
    assert _check_seed(7) == 7 and _check_seed(None) is None
    for bad in ([], [""], [3]):
        try:
            validate.check_prompts(bad)
        except ValueError:
            continue
        raise AssertionError(f"check_prompts accepted {bad!r}")
    assert pst.bounds.__module__ == "posterior.bounds" and pst.Bounds.__module__ == "posterior.diagnostics.bounds"


def test_bounds_stays_a_function_whatever_is_imported_first():
    """The runner moved up to posterior/bounds.py, a module named like the public function:
    importing the module first must not replace ``pst.bounds`` (posterior.lazy keeps the name)."""
    code = (
        "import posterior as pst\n"
        "import posterior.bounds\n"
        "from posterior.bounds import Bounds, bounds\n"
        "assert pst.bounds is bounds and pst.Bounds is Bounds and callable(pst.bounds)\n"
        "assert pst.train.FitConfig.__module__ == 'posterior.train.config'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
