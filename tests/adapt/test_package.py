"""The package's public names resolve to their defining modules' objects."""

from __future__ import annotations

import sys

import pytest

import transfuse.adapt


def test_every_public_name_resolves():
    for name in transfuse.adapt.__all__:
        value = getattr(transfuse.adapt, name)
        if callable(value) and hasattr(value, "__module__"):
            assert getattr(sys.modules[value.__module__], value.__name__, None) is value
    assert set(transfuse.adapt.__all__) <= set(dir(transfuse.adapt))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        transfuse.adapt.no_such_name  # noqa: B018
