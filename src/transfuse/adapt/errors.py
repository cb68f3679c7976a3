"""Named errors of test-time adaptive merging: each says what is wrong and what to do about it."""

from __future__ import annotations

from transfuse.errors import ShapeMismatchError, TransfuseError


class AdaptError(TransfuseError):
    """Bad input to test-time adaptive merging (AdaMerging)."""


class AdaptParameterError(AdaptError, ValueError):
    """An option of ``adamerge`` (steps, lr, init, bounds, granularity, density, budget) is out of range."""


class UnknownTaskError(AdaptError, KeyError):
    """A task named in one input (batches, heads, model paths, a coefficient lookup) is not among the tasks."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class EmptyBatchesError(AdaptError):
    """A task has no unlabeled batch to adapt on (an empty sequence, or an iterator that ran out)."""


class TaskVectorMismatchError(AdaptError, ShapeMismatchError):
    """A task vector's tensor is missing from the base, has another shape, or is not floating point."""


class NonFiniteObjectiveError(AdaptError):
    """The entropy objective or its gradient became inf/NaN during adaptation."""


class RecipeExportError(AdaptError):
    """Learned coefficients cannot be written as a recipe (a model path is missing, or a filter is ambiguous)."""
