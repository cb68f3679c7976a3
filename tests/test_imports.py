"""Import boundaries: the merge layers load without the layers above them, and the lazy public names resolve.

Each check runs in a fresh interpreter, since this test process has imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

UPPER_LAYERS = ("transfuse.select", "transfuse.eval", "transfuse.bench", "transfuse.train")
PACKAGES = (
    "transfuse",
    "transfuse.bench",
    "transfuse.data",
    "transfuse.eval",
    "transfuse.io",
    "transfuse.models",
    "transfuse.adapt",
    "transfuse.statistics",
    "transfuse.routed",
)


def _loaded_after(statement: str) -> list[str]:
    """The transfuse modules (and torch, if loaded) in a fresh interpreter after `statement`."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [m for m in json.loads(done.stdout.splitlines()[-1]) if m.startswith("transfuse") or m == "torch"]


@pytest.mark.parametrize(
    "statement", ["import transfuse", "import transfuse.methods", "import transfuse.api"]
)
def test_the_merge_layers_do_not_load_the_layers_above(statement):
    loaded = _loaded_after(statement)
    above = [m for m in loaded if m.startswith(UPPER_LAYERS)]
    assert not above, f"{statement!r} loaded {above}"


def test_importing_the_package_sets_the_huge_page_default_before_torch():
    code = (
        "import os, sys; os.environ.pop('THP_MEM_ALLOC_ENABLE', None); import transfuse; "
        "print(os.environ['THP_MEM_ALLOC_ENABLE'], 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "False"]


def test_one_module_of_a_package_does_not_load_its_siblings():
    loaded = _loaded_after("import transfuse.io.files, transfuse.eval.metrics, transfuse.dtypes")
    assert not [m for m in loaded if m.startswith(("transfuse.io.writer", "transfuse.eval.sweep"))]
    assert "torch" not in _loaded_after(
        "import transfuse.dtypes"
    )  # the CLI checks --dtype before loading torch


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves(package):
    module = __import__(package, fromlist=["__all__"])
    for name in module.__all__:
        value = getattr(module, name)
        assert value is not None
        # a function or class is the defining module's own object, not a copy or a submodule
        if callable(value) and hasattr(value, "__module__"):
            assert getattr(sys.modules[value.__module__], value.__name__, None) is value
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018


def test_the_top_level_api_and_version():
    import transfuse
    from transfuse._version import __version__
    from transfuse.api import merge, merge_state_dicts
    from transfuse.data.task import load_task_suite
    from transfuse.eval.harness import evaluate
    from transfuse.select.rank import rank_sources

    assert transfuse.__version__ == __version__
    assert (transfuse.merge, transfuse.merge_state_dicts) == (merge, merge_state_dicts)
    assert (transfuse.load_task_suite, transfuse.evaluate, transfuse.rank_sources) == (
        load_task_suite,
        evaluate,
        rank_sources,
    )
    from transfuse import merge as imported  # the `from` form goes through the same lazy lookup

    assert imported is merge
