"""Named errors.  Every one says what is wrong and what to do about it."""

from __future__ import annotations


class TransfuseError(Exception):
    """Base class of every error transfuse raises on purpose."""


class RecipeError(TransfuseError):
    """The recipe is malformed (unknown key, bad value, wrong type)."""


class UnknownMethodError(RecipeError):
    """The recipe names a merge method transfuse does not have."""


class DuplicateInputError(RecipeError):
    """The recipe lists the same model twice."""


class ParameterError(RecipeError):
    """A method parameter is unknown, missing, of the wrong type or out of range."""


class CheckpointError(TransfuseError):
    """A checkpoint cannot be found or read."""


class MissingTensorError(CheckpointError):
    """A tensor the merge needs is missing from one input."""


class NotSameBaseError(CheckpointError):
    """The inputs are not fine-tunes of the same base: their tensor names differ."""


class ShapeMismatchError(CheckpointError):
    """A tensor has a different shape in two inputs."""


class DtypeMismatchError(CheckpointError):
    """A tensor has an incompatible dtype (e.g. integer vs float) in two inputs."""


class VocabSizeMismatchError(ShapeMismatchError):
    """Embedding / LM-head rows differ between inputs (different vocabularies)."""


class NonFiniteTensorError(CheckpointError):
    """An input tensor holds NaN or Inf values."""


class LoraAdapterError(CheckpointError):
    """A PEFT LoRA adapter cannot be applied to the base."""


class OutputExistsError(TransfuseError):
    """The output directory exists and is not empty."""


class WriteError(TransfuseError):
    """The output cannot be written (I/O error such as a full disk, an invalid name, or writer misuse)."""


class OutputOverlapsInputError(TransfuseError):
    """The output dir is, contains or lies inside one of the merge's inputs."""


class ConfigError(CheckpointError):
    """A model's config.json is missing, unreadable, or disagrees with the tensors or the tokenizer."""


class NonFiniteOutputError(TransfuseError):
    """A merged tensor holds inf/NaN (overflow in the method or in the cast to the output dtype)."""


class InsufficientMemoryError(TransfuseError):
    """The merge's estimated peak memory exceeds the memory available."""


class InvalidOptionError(TransfuseError):
    """A run option (device, threads, shard size) is invalid."""
