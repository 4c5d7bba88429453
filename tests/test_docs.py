"""The documentation stays complete and its code runs.

The Sphinx build itself runs in CI (``python -m sphinx -W --keep-going -b html docs
docs/_build/html``); these tests check the page sources and execute the examples without it.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io
import pkgutil
import re
import runpy
from pathlib import Path
from types import ModuleType
from typing import List

import pytest
import torch

import ncp
from tests._docpages import diff_sides, named_blocks, page_batch, page_model

DOCS = Path(__file__).resolve().parent.parent / "docs"
API_PAGE = DOCS / "api.rst"

_AUTODOC = re.compile(
    r"^\.\.\s+auto(?:module|class|function|method|attribute|property|data|exception)::\s+(\S+)",
    re.MULTILINE,
)


def _api_targets() -> List[str]:
    return _AUTODOC.findall(API_PAGE.read_text())


def _public_names() -> List[str]:
    return (
        [f"ncp.{n}" for n in ncp.__all__]
        + [f"ncp.functional.{n}" for n in ncp.functional.__all__]
        + [f"ncp.losses.{n}" for n in ncp.losses.__all__]
    )


def _resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted`` and getattr the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


# --- the API page lists every public name --------------------------------------------------


def test_every_public_name_has_an_autodoc_directive():
    targets = set(_api_targets())
    missing = [name for name in _public_names() if name not in targets]
    assert not missing, f"public names without an autodoc directive in docs/api.rst: {missing}"


def test_api_page_documents_each_target_once_and_only_existing_objects():
    targets = _api_targets()
    duplicates = sorted({t for t in targets if targets.count(t) > 1})
    assert not duplicates, f"documented twice in docs/api.rst: {duplicates}"
    for target in targets:
        assert _resolve(target) is not None, target


@pytest.mark.parametrize("module", [ncp.functional, ncp.losses], ids=lambda m: m.__name__)
def test_public_functions_are_exported_in_all(module: ModuleType):
    # A public function missing from __all__ would silently escape the check above.
    public = {
        name
        for name, obj in vars(module).items()
        if not name.startswith("_") and inspect.isfunction(obj)
    }
    assert public == set(module.__all__)


def test_sphinx_version_comes_from_the_package():
    conf = runpy.run_path(str(DOCS / "conf.py"))
    assert conf["release"] == ncp.__version__
    assert ncp.__version__.startswith(conf["version"])


# --- docstring examples ----------------------------------------------------------------------


def _ncp_modules() -> List[ModuleType]:
    """Every module of the package that imports here.

    Only an adapter for an optional dependency may fail to import, and its error must say how
    to install it (``pip install "ncp[higher]"``); any other import error fails collection.
    """
    names = [ncp.__name__] + [
        m.name for m in pkgutil.walk_packages(ncp.__path__, prefix=f"{ncp.__name__}.")
    ]
    modules = []
    for name in sorted(names):
        try:
            modules.append(importlib.import_module(name))
        except ImportError as err:
            if 'pip install "ncp[' not in str(err):
                raise
    return modules


def _doctests(module: ModuleType) -> List[doctest.DocTest]:
    return [t for t in doctest.DocTestFinder().find(module) if t.examples]


_MODULES_WITH_EXAMPLES = [m for m in _ncp_modules() if _doctests(m)]


@pytest.mark.parametrize("module", _MODULES_WITH_EXAMPLES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module: ModuleType):
    out = io.StringIO()
    runner = doctest.DocTestRunner(verbose=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for test in _doctests(module):
            runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, out.getvalue()


@pytest.mark.parametrize(
    "name",
    [
        "ncp.meta_step",
        "ncp.adapt",
        "ncp.forward",
        "ncp.MetaConfig",
        "ncp.ContextPruner",
        "ncp.BootstrapMetaLoss",
        "ncp.GradRescaler",
        "ncp.MemoryMeter",
        "ncp.losses.mse",
        "ncp.losses.cross_entropy",
    ],
)
def test_entry_points_have_an_example_that_calls_them(name: str):
    tests = doctest.DocTestFinder(recurse=False).find(_resolve(name), name)
    source = "".join(e.source for t in tests for e in t.examples)
    assert f"{name}(" in source, f"the docstring of {name} has no `Example:` calling it"


# --- the code on the pages runs ----------------------------------------------------------------


def test_quickstart_diff_applies_to_the_plain_loop():
    blocks = named_blocks("quickstart.md")
    old, new = diff_sides(blocks["quickstart-diff"])
    assert old == blocks["quickstart-before"]
    added = [line for line in blocks["quickstart-diff"].splitlines() if line.startswith("+")]
    assert len(added) == 5, "the quickstart's prose says five lines are added"
    assert "ncp.meta_step(model, (x, y), cfg)" in new and "loss.backward()" in new


def test_quickstart_code_runs_and_the_maml_config_reproduces_the_plain_loop():
    blocks = named_blocks("quickstart.md")
    x, y = page_batch(1)

    before = {"make_model": page_model, "loader": [(x, y)]}
    exec(blocks["quickstart-before"], before)
    _, new = diff_sides(blocks["quickstart-diff"])
    after = {"make_model": page_model, "loader": [(x, y)]}
    exec(new, after)
    assert isinstance(after["out"], ncp.MetaStepResult)
    assert torch.isfinite(after["loss"]).item()
    # the optimizer step of the edited loop changed the model
    assert not all(
        torch.equal(p, q)
        for p, q in zip(after["model"].parameters(), page_model().parameters(), strict=True)
    )

    # What the page claims: MAML settings of ncp give the removed lines' loss.
    maml = ncp.MetaConfig(inner_steps=4, pruner=None, bootstrap=None)
    expected = ncp.meta_step(page_model(), (x, y), maml).loss
    torch.testing.assert_close(before["loss"].detach(), expected.detach())

    x_test, y_test = page_batch(2, tasks=3)
    after.update(x_test=x_test, y_test=y_test)
    exec(blocks["quickstart-test-time"], after)
    assert after["pred"].shape == (3, 64, 3)
    assert torch.isfinite(after["pred"]).all()


def test_concepts_code_runs():
    blocks = named_blocks("concepts.md")
    x, y = page_batch(3)
    cfg = ncp.MetaConfig(inner_steps=2, pruner=ncp.ContextPruner(ratio=0.25))

    ns = {"ncp": ncp, "model": page_model(), "x": x, "y": y, "cfg": cfg}
    exec(blocks["concepts-memory-meter"], ns)
    assert ns["meter"].peak_saved_bytes > 0
    assert ns["meter"].saved_bytes == 0  # everything freed by backward

    ns = {"model": page_model(), "x": x, "y": y}
    exec(blocks["concepts-functional-step"], ns)
    assert ns["idx"].shape == (2, 16)
    assert ns["params"]["2.weight"].shape == (2, 3, 16)
    assert ns["params"]["2.weight"].requires_grad  # still attached: a differentiable step
