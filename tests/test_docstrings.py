"""The API reference: every public function, class and method documented in numpydoc form (checked by
numpydoc's own validator), and the Examples in the docstrings run as written."""
import doctest
import importlib
import inspect

import numpy as np
import pytest
from numpydoc.docscrape import ClassDoc
from numpydoc.validate import validate

# Modules whose ``__all__`` is the public API (the README names each).
PUBLIC = ["lsfov", "lsfov.psf", "lsfov.simulate", "lsfov.io", "lsfov.operators", "lsfov.calibrate", "lsfov.estimate",
          "lsfov.restore", "lsfov.restore.chunked", "lsfov.cluster"]

# What a reader of the reference needs of every entry: a docstring, each parameter named in order with a
# type and a description, nothing documented that is not a parameter, and what it returns or yields.
CODES = {"GL08", "PR01", "PR02", "PR03", "PR04", "PR06", "PR07", "PR10", "RT01", "RT03", "YD01", "SS01"}

# The entry points a user starts from show how, in an Examples section that runs (below).
WITH_EXAMPLES = [
    "lsfov.psf.gaussian", "lsfov.psf.zernike", "lsfov.psf.PSFModel.render",
    "lsfov.operators.ProductConvolution.from_grid", "lsfov.operators.ProductConvolution.from_basis",
    "lsfov.restore.tv_rl.deconvolve", "lsfov.restore.sparse_smooth.sparse_smooth_deblur",
    "lsfov.calibrate.beads.bead_psfs", "lsfov.calibrate.basis.psf_basis", "lsfov.calibrate.single.calibrate_operator",
    "lsfov.calibrate.subspace.learn_subspace", "lsfov.calibrate.bss.identify_operator",
    "lsfov.estimate.model.load_model", "lsfov.estimate.mapping.estimate_psf_map",
    "lsfov.estimate.mapping.operator_from_psf_map", "lsfov.estimate.depth.estimate_depth",
    "lsfov.estimate.depth.calibrate_depth", "lsfov.estimate.blind.blind_deconvolve", "lsfov.estimate.synth.synthesize",
    "lsfov.io.open_image", "lsfov.io.save", "lsfov.io.open_result",
    "lsfov.simulate.bead_field", "lsfov.simulate.tilted_surface", "lsfov.simulate.degrade",
]


def _public_objects():
    """{qualified name: object} of every public callable and its public methods and properties."""
    out = {}
    for name in PUBLIC:
        mod = importlib.import_module(name)
        for attr in mod.__all__:
            obj = getattr(mod, attr)
            if inspect.ismodule(obj) or not callable(obj) or not obj.__module__.startswith("lsfov"):
                continue
            q = f"{obj.__module__}.{obj.__qualname__}"
            out[q] = obj
            if inspect.isclass(obj):
                for a, v in vars(obj).items():
                    if not a.startswith("_") and (callable(v) or isinstance(v, (property, classmethod, staticmethod))):
                        out[f"{q}.{a}"] = v
    return out


PUBLIC_OBJECTS = _public_objects()


def _problems(qualname):
    obj = PUBLIC_OBJECTS[qualname]
    if isinstance(obj, property):  # (no parameters nor Returns; numpydoc cannot place a lambda's source)
        return [] if (obj.__doc__ or "").strip() else [("GL08", "the property has no docstring")]
    errors = [(c, m) for c, m in validate(qualname)["errors"] if c in CODES]
    if inspect.isclass(obj):
        # A class's fields may be documented as Attributes (results, and operators built by their
        # classmethods); private constructor arguments (leading underscore) are not for users.
        doc = ClassDoc(obj)
        named = {p.name for p in doc["Parameters"]} | {p.name for p in doc["Attributes"]}
        try:
            params = [p for p in inspect.signature(obj).parameters if not p.startswith("_") and p != "self"]
        except ValueError:  # (an exception class: Python's own constructor)
            params = []
        missing = [p for p in params if p not in named]
        errors = [(c, m) for c, m in errors if c not in ("PR01", "PR02", "PR03")]
        if missing:
            errors.append(("PR01", f"fields {missing} are neither Parameters nor Attributes"))
    return errors


@pytest.mark.parametrize("qualname", sorted(PUBLIC_OBJECTS))
def test_documented(qualname):
    problems = _problems(qualname)
    assert not problems, f"{qualname}: " + "; ".join(f"{c} {m}" for c, m in problems)


def _badly_documented(a, b):
    """Add.

    Parameters
    ----------
    b : int
        The second.
    """
    return a + b


def test_the_checks_can_fail():
    """The validator sees an undocumented parameter and a missing Returns (so the test above can fail)."""
    codes = {c for c, _ in validate(f"{__name__}._badly_documented")["errors"]} & CODES
    assert codes == {"PR01", "RT01"}


def _modules_with_examples():
    """Every module of the package whose docstrings hold examples (an example anywhere runs)."""
    import pkgutil

    import lsfov

    names = sorted(m.name for m in pkgutil.walk_packages(lsfov.__path__, "lsfov.") if m.name != "lsfov.__main__")
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [n for n in names if any(t.examples for t in finder.find(importlib.import_module(n), n))]


EXAMPLE_MODULES = _modules_with_examples()


def test_entry_points_have_examples():
    """Each entry point's docstring has examples, and they are among those that run (below)."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = {t.name for m in EXAMPLE_MODULES for t in finder.find(importlib.import_module(m), m) if t.examples}
    missing = [q for q in WITH_EXAMPLES if q not in found]
    assert not missing, f"no examples that run in {missing}"


@pytest.mark.parametrize("module", EXAMPLE_MODULES)
def test_examples_run(module, tmp_path, monkeypatch):
    """The Examples run as written, in an empty folder (those that write files write there)."""
    monkeypatch.chdir(tmp_path)
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(mod, module, globs={"np": np}) if t.examples]
    for t in tests:
        runner.run(t)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, f"{res.failed} of {res.attempted} examples in {module} failed (printed above)"


def test_the_reference_builds(tmp_path):
    """``make docs``: Sphinx renders every public docstring without a warning (bad reST shows as one)."""
    from pathlib import Path

    from sphinx.cmd.build import build_main

    docs = Path(__file__).resolve().parent.parent / "docs"
    args = ["-W", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"), str(docs), str(tmp_path / "html")]
    assert build_main(args) == 0, "the API reference has warnings (printed above)"
    assert "lsfov.restore.deconvolve" in (tmp_path / "html" / "index.html").read_text()
