"""Named errors of routed (task-conditioned) models.  Each says what is wrong and what to do about it."""

from __future__ import annotations

from transfuse.errors import TransfuseError


class RoutedError(TransfuseError):
    """Base class of the errors a routed model raises on purpose."""


class MissingTaskIdError(RoutedError):
    """A routed model without a router was called without ``task_ids``."""


class UnknownTaskError(RoutedError):
    """A task id names no task of the routed model."""


class TaskIdsMismatchError(RoutedError):
    """``task_ids`` do not match the batch (no input has one row per task id, or the list is empty)."""


class RoutedOutputError(RoutedError):
    """The module's outputs cannot be put back in batch order (not one row per example)."""


class ModuleMismatchError(RoutedError):
    """The module's structure (names, shapes) does not match the routed model's weights."""


class MissingModuleError(RoutedError):
    """A saved routed model is not a transformers model, so ``load`` needs ``module=``."""


class RoutedFormatError(RoutedError):
    """A routed-model directory is malformed: its manifest or files disagree, or a file is missing or damaged."""


class UnsupportedFormatVersionError(RoutedFormatError):
    """The directory was written in a format version this transfuse does not read."""
