"""The package version: one place, read by ``transfuse.__version__``, the merge provenance and pyproject."""

__version__ = "0.1.0"
