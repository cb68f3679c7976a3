"""The method contract and the registry of merge methods.

A method is one pure function per output tensor::

    @register("ties", params=(...), paper="...")
    def ties(base: Tensor, deltas: Tensor, weights: Tensor, *, density: Tensor, ..., ctx: MethodContext) -> Tensor

- ``base``: the base model's tensor, float32 (compute dtype), read-only.
- ``deltas``: stacked task vectors ``[K, *base.shape]`` (fine-tuned - base), float32.  The buffer belongs to
  this call: the engine's workers reuse their work buffers from job to job (``engine.WorkBuffers``), but only
  after the previous result is out, so a method MAY overwrite ``deltas`` in place (saves one ``[K, *shape]``
  allocation) and may return a view of it (the engine copies a result that shares a work buffer's memory).
- ``weights``: ``[K]`` float32, the per-model ``weight`` parameter.
- per-model parameters (``ParamSpec.per_model``) arrive as ``[K]`` float32 tensors; global ones as Python
  scalars.  Values are already resolved for this tensor (filters, layer gradients) and validated.  ``inert``
  parameters (accepted for recipe compatibility, no effect) are never passed.
- ``ctx``: a method that declares a keyword-only ``ctx`` parameter receives a ``MethodContext``
  (``methods/context.py``): its random generator (``random=True`` methods must declare it), its per-tensor
  statistics (``needs``), the tensor's name and where its chunk loops run.  Methods that need none of it do
  not declare it and stay plain functions of their tensors.
- The return value is the MERGED TENSOR (not a delta), any float dtype; the engine casts it to the output dtype.
- Methods never read files and allocate at most a small constant number of ``[K, *shape]`` buffers; the tensor
  name is in ``ctx.name`` for messages, and the math never depends on it.

Families (``MethodSpec.family``): ``data-free`` methods need only the weights; ``needs-statistics`` methods also
read per-tensor statistics computed from data (``needs``: e.g. Gram matrices for RegMean, Fisher information);
``routed`` methods keep several experts and produce routing as well as (or instead of) one merged tensor
(``outputs``).  Every method registered today is data-free; the sweep and the benchmark run only data-free
methods.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from transfuse.errors import ParameterError, UnknownMethodError

ParamValue = float | int | bool | str


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method.

    ``low``/``high`` are inclusive bounds for numbers (``None`` = unbounded); ``choices`` restricts strings.
    ``per_model`` parameters may be set per input model (MergeKit's ``models[].parameters``) and reach the
    method as a ``[K]`` tensor.  An ``inert`` parameter is accepted and validated (so that recipes written for
    MergeKit run unchanged) but never passed to the method, because it cannot change the result; ``doc`` says
    why.
    """

    name: str
    kind: type
    default: ParamValue | None
    doc: str = ""
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    inert: bool = False

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


#: What a method needs besides the weights: nothing (``data-free``), per-tensor statistics computed from data
#: (``needs-statistics``), or several experts kept and routed between (``routed``).
MethodFamily = Literal["data-free", "needs-statistics", "routed"]
FAMILIES: tuple[MethodFamily, ...] = get_args(MethodFamily)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, what it accepts and what it needs.

    - ``family``: see ``MethodFamily``.
    - ``needs``: names of the per-tensor statistics the method reads from ``ctx.statistics`` (extra per-tensor
      inputs, e.g. ``"gram"`` for RegMean's input Gram matrices, ``"fisher"`` for Fisher merging); empty for
      data-free methods.  The engine refuses to run the method without statistics; per tensor, it passes all
      of them, or none when the tensor has none and the method has a ``fallback``.
    - ``optional_statistics``: further statistics passed when a tensor has them (e.g. ``"gram_input_dim"``, which
      of a weight's dims is its input: 0 for GPT-2's Conv1D, 1, the default, for ``nn.Linear``).
    - ``fallback``: how the method merges a tensor that the statistics do not cover (RegMean: biases, norms and
      embeddings, which are not linear maps, are averaged); ``None``: every tensor must have statistics.
    - ``outputs``: names of extra per-tensor outputs (e.g. a router's gate); such a method returns
      ``(merged, {name: tensor})``.  Empty: the method returns the merged tensor only.  (No writer places extra
      outputs yet, so the engine refuses such a method with a clear error.)
    - ``takes_context``: whether the function declares ``ctx`` (set by ``register`` from its signature).
    """

    name: str
    fn: Callable[..., Any]
    params: tuple[ParamSpec, ...]
    paper: str
    summary: str
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    needs_base: bool = True
    # Methods that work with or without a base (nuslerp, multislerp, karcher): a base given in the recipe is the
    # base, never one more model, even when it is also listed under `models` (as in MergeKit).
    base_optional: bool = False
    mergekit_name: str | None = None  # the name MergeKit gives the same method, if it has it
    # Cross-parameter rule checked by the plan for every tensor before any work: check(global, per_model) -> error
    # message naming the offending model index, or None.
    check: Callable[[dict[str, Any], dict[str, tuple[float, ...]]], str | None] | None = None
    # A global parameter that only scales the merged delta: merged(p) = base + p * D, D independent of p.  A
    # parameter sweep then merges once and rescales (see transfuse.eval.sweep).
    output_scale: str | None = None
    family: MethodFamily = "data-free"
    needs: tuple[str, ...] = ()
    optional_statistics: tuple[str, ...] = ()
    fallback: str | None = None
    outputs: tuple[str, ...] = ()
    takes_context: bool = False
    # A per-model parameter at which the method returns its one input unchanged (passthrough's scale = 1): the
    # plan then copies that tensor's bytes instead of merging it (same dtype, one model, no base).
    identity_param: str | None = None

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

    @property
    def data_free(self) -> bool:
        return self.family == "data-free"


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
    base_optional: bool = False,
    mergekit_name: str | None = None,
    check: Callable[[dict[str, Any], dict[str, tuple[float, ...]]], str | None] | None = None,
    output_scale: str | None = None,
    family: MethodFamily = "data-free",
    needs: Sequence[str] = (),
    optional_statistics: Sequence[str] = (),
    fallback: str | None = None,
    outputs: Sequence[str] = (),
    identity_param: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as merge method ``name``.  The summary is the docstring's first line.

    Registration checks the declaration against itself (programming errors, ``ValueError``): a known
    ``family``; ``needs`` empty exactly for data-free methods; a keyword-only ``ctx`` parameter on every method
    that is random, needs statistics or has extra outputs (its only way to get them).
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        ctx = inspect.signature(fn).parameters.get("ctx")
        takes_context = ctx is not None
        if ctx is not None and ctx.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise ValueError(f"merge method {name!r}: ctx must be a keyword-only parameter")
        if family not in FAMILIES:
            raise ValueError(
                f"merge method {name!r}: family must be one of {', '.join(FAMILIES)}, got {family!r}"
            )
        if (family == "data-free") == bool(needs):
            raise ValueError(
                f"merge method {name!r}: a data-free method needs no statistics, any other declares them "
                f"(family={family!r}, needs={tuple(needs)!r})"
            )
        if (optional_statistics or fallback) and not needs:
            raise ValueError(
                f"merge method {name!r}: optional statistics and a fallback only apply to a method that needs "
                "statistics"
            )
        if (random or needs or outputs) and not takes_context:
            raise ValueError(
                f"merge method {name!r} is random, needs statistics or has extra outputs: declare a "
                "keyword-only ctx: MethodContext parameter to receive them"
            )
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
            base_optional=base_optional,
            mergekit_name=mergekit_name,
            check=check,
            output_scale=output_scale,
            family=family,
            needs=tuple(needs),
            optional_statistics=tuple(optional_statistics),
            fallback=fallback,
            outputs=tuple(outputs),
            takes_context=takes_context,
            identity_param=identity_param,
        )
        return fn

    return decorate


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name``; ``UnknownMethodError`` suggests the closest name and lists the
    ones there are."""
    _load_all()
    try:
        return _METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownMethodError(
            f"unknown merge method {name!r}{hint}; available: {', '.join(sorted(_METHODS))} "
            "(run `transfuse methods` for their parameters)"
        ) from None


def available_methods(family: MethodFamily | None = None) -> list[MethodSpec]:
    """Every registered method (of ``family``, if given), sorted by name."""
    _load_all()
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown method family {family!r}; choose one of {', '.join(FAMILIES)}")
    return [_METHODS[n] for n in sorted(_METHODS) if family is None or _METHODS[n].family == family]


def unregister(name: str) -> None:
    """Remove method ``name`` from the registry (for tests that register a method of their own)."""
    del _METHODS[name]


def _load_all() -> None:
    # Importing the package imports every method module, which registers it.
    import transfuse.methods  # noqa: F401
