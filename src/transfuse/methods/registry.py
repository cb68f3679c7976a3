"""The method contract and the registry of data-free merge methods.

A method is one pure function per output tensor::

    @register("ties", params=(...), paper="...")
    def ties(base: Tensor, deltas: Tensor, weights: Tensor, *, density: Tensor, ...) -> Tensor

- ``base``: the base model's tensor, float32 (compute dtype), read-only.
- ``deltas``: stacked task vectors ``[K, *base.shape]`` (fine-tuned - base), float32.  The engine owns this
  buffer and allocates it fresh for each tensor, so a method MAY overwrite it in place (saves one
  ``[K, *shape]`` allocation) and may return a view of it (the engine copies such a result out).
- ``weights``: ``[K]`` float32, the per-model ``weight`` parameter.
- per-model parameters (``ParamSpec.per_model``) arrive as ``[K]`` float32 tensors; global ones as Python
  scalars.  Values are already resolved for this tensor (filters, layer gradients) and validated.
- random methods (``random=True``) also get ``generator: torch.Generator`` seeded from (seed, tensor name).
- The return value is the MERGED TENSOR (not a delta), any float dtype; the engine casts it to the output dtype.
- Methods never read files, never see tensor names, and allocate at most a small constant number of
  ``[K, *shape]`` buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transfuse.errors import ParameterError, UnknownMethodError

ParamValue = float | int | bool | str


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method.

    ``low``/``high`` are inclusive bounds for numbers (``None`` = unbounded); ``choices`` restricts strings.
    ``per_model`` parameters may be set per input model (MergeKit's ``models[].parameters``) and reach the
    method as a ``[K]`` tensor.
    """

    name: str
    kind: type
    default: ParamValue | None
    doc: str = ""
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None

    def validate(self, value: Any, where: str = "") -> ParamValue:
        """Return ``value`` converted to this parameter's type, or raise ``ParameterError``."""
        at = f" ({where})" if where else ""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ParameterError(f"parameter {self.name!r}{at} must be true or false, got {value!r}")
        if self.kind in (float, int):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ParameterError(f"parameter {self.name!r}{at} must be a number, got {value!r}")
            try:
                number = float(value)
            except ValueError:
                raise ParameterError(f"parameter {self.name!r}{at} must be a number, got {value!r}") from None
            if not math.isfinite(number):
                raise ParameterError(f"parameter {self.name!r}{at} must be finite, got {value!r}")
            if self.kind is int:
                if number != int(number):
                    raise ParameterError(f"parameter {self.name!r}{at} must be an integer, got {value!r}")
                number = int(number)
            if self.low is not None and number < self.low:
                raise ParameterError(
                    f"parameter {self.name!r}{at} must be >= {self.low}, got {value!r}: {self.doc}"
                )
            if self.high is not None and number > self.high:
                raise ParameterError(
                    f"parameter {self.name!r}{at} must be <= {self.high}, got {value!r}: {self.doc}"
                )
            return number
        if self.kind is str:
            if not isinstance(value, str):
                raise ParameterError(f"parameter {self.name!r}{at} must be a string, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise ParameterError(
                    f"parameter {self.name!r}{at} must be one of {', '.join(self.choices)}; got {value!r}"
                )
            return value
        raise TypeError(f"unsupported parameter kind {self.kind}")  # programming error, not user error


#: The per-model weight every method receives as ``weights``.
WEIGHT = ParamSpec("weight", float, 1.0, "per-model weight (negative = subtract that task)", per_model=True)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function and what it accepts."""

    name: str
    fn: Callable[..., Any]
    params: tuple[ParamSpec, ...]
    paper: str
    summary: str
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    needs_base: bool = True
    mergekit_name: str | None = None  # the name MergeKit gives the same method, if it has it
    # Cross-parameter rule checked by the plan for every tensor before any work: check(global, per_model) -> error
    # message naming the offending model index, or None.
    check: Callable[[dict[str, Any], dict[str, tuple[float, ...]]], str | None] | None = None
    # A global parameter that only scales the merged delta: merged(p) = base + p * D, D independent of p.  A
    # parameter sweep then merges once and rescales (see transfuse.eval.sweep).
    output_scale: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> ParamSpec:
        for spec in self.all_params:
            if spec.name == name:
                return spec
        raise ParameterError(
            f"method {self.name!r} has no parameter {name!r}; it accepts: "
            + ", ".join(p.name for p in self.all_params)
        )

    @property
    def all_params(self) -> tuple[ParamSpec, ...]:
        return (WEIGHT, *self.params)

    def defaults(self) -> dict[str, ParamValue | None]:
        return {p.name: p.default for p in self.all_params}


_METHODS: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    params: Sequence[ParamSpec] = (),
    paper: str,
    min_models: int = 1,
    max_models: int | None = None,
    random: bool = False,
    needs_base: bool = True,
    mergekit_name: str | None = None,
    check: Callable[[dict[str, Any], dict[str, tuple[float, ...]]], str | None] | None = None,
    output_scale: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as merge method ``name``.  The summary is the docstring's first line."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else name
        _METHODS[name] = MethodSpec(
            name=name,
            fn=fn,
            params=tuple(params),
            paper=paper,
            summary=summary,
            min_models=min_models,
            max_models=max_models,
            random=random,
            needs_base=needs_base,
            mergekit_name=mergekit_name,
            check=check,
            output_scale=output_scale,
        )
        return fn

    return decorate


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name``; ``UnknownMethodError`` lists the ones there are."""
    _load_all()
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown merge method {name!r}; available: {', '.join(sorted(_METHODS))} "
            "(run `transfuse methods` for their parameters)"
        ) from None


def available_methods() -> list[MethodSpec]:
    """Every registered method, sorted by name."""
    _load_all()
    return [_METHODS[n] for n in sorted(_METHODS)]


def _load_all() -> None:
    # Importing the package imports every method module, which registers it.
    import transfuse.methods  # noqa: F401
