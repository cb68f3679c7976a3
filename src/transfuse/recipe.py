"""The merge recipe: MergeKit's YAML schema (the subset transfuse supports) plus a few keys of our own.

Accepted top-level keys::

    merge_method: ties                # any name `transfuse methods` lists
    base_model: path/to/base          # HF dir, .safetensors/.bin/.pt file
    models:                           # fine-tuned models: HF dirs, files, or PEFT LoRA adapter dirs
      - model: path/to/expert_a
        parameters: {weight: 1.0, density: 0.5}
      - model: path/to/expert_b       # "path+path/to/lora" (MergeKit syntax) applies a LoRA to a model
    parameters: {lambda: 1.0}         # global parameters; also the default of per-model ones
    dtype: float32                    # output dtype when out_dtype is unset (MergeKit's compute dtype; transfuse
                                      # always reads each input in its stored dtype and computes in float32)
    out_dtype: bfloat16               # dtype of the written tensors (default: dtype, else the base's)
    tokenizer_source: base            # the output tokenizer: base | union | a model path; with union or a model
                                      # (or differing vocabularies) embeddings and LM head are aligned by token
    tokenizer: {source: union, tokens: {"<tok>": {source: path, force: false}}, pad_to_multiple_of: 64}
                                      # MergeKit's tokenizer block (instead of tokenizer_source)
    chat_template: chatml             # a named template (transfuse.chat_templates), "auto", or a Jinja string
    config_source: path/to/expert_a   # transfuse: take config.json from this model (default: the base's)
    seed: 0                           # transfuse: seed of the random methods (DARE, DELLA)
    vocab_mismatch: error             # transfuse: error | truncate | pad (embedding / LM-head rows)

A parameter value is a scalar, a list of numbers interpolated across layers (a "gradient"), or a list of
``{filter: substring, value: ...}`` entries where the first entry whose filter occurs in the tensor name wins
(an entry without filter, or with ``"*"``, matches every tensor) — as in MergeKit.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from transfuse.dtypes import DTYPE_NAMES
from transfuse.errors import DuplicateInputError, ParameterError, RecipeError
from transfuse.methods.registry import MethodSpec, ParamValue, get_method
from transfuse.vocabulary import TokenizerSpec, parse_tokenizer_block

TOP_LEVEL_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "config_source",
    "seed",
    "vocab_mismatch",
    "name",
}
# MergeKit keys transfuse does not implement: named so the error says so instead of "unknown key".
UNSUPPORTED_MERGEKIT_KEYS = {
    "modules": "per-module definitions",
}
VOCAB_MODES = ("error", "truncate", "pad")

Setting = Any  # scalar | list of scalars | list of {filter, value}

# Bounds on a recipe's YAML: a real recipe has a few hundred nodes and a depth under 10.  Aliases let a 2 KB
# file expand to billions of nodes ("billion laughs"), and deep nesting overflows the parser's recursion.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64


@dataclass(frozen=True)
class ModelEntry:
    """One input model: where it is and its own parameter settings."""

    path: str
    parameters: dict[str, Setting] = field(default_factory=dict)
    lora: str | None = None  # a LoRA adapter applied on top of `path` ("model+lora" syntax)
    # transfuse: this model's statistics file (Gram matrices, Fisher) for a statistics-based method
    statistics: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path}+{self.lora}" if self.lora else self.path


@dataclass(frozen=True)
class SliceSource:
    """One input of an output slice: layers ``[start, end)`` of a model, with its own parameter settings."""

    path: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] = field(default_factory=dict)
    lora: str | None = None

    @property
    def label(self) -> str:
        name = f"{self.path}+{self.lora}" if self.lora else self.path
        return f"{name}[{self.layer_range[0]}:{self.layer_range[1]}]"

    @property
    def layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclass(frozen=True)
class OutputSlice:
    """A run of output layers merged from the same number of layers of each source (MergeKit's ``slices``).

    ``base_model`` overrides the recipe's for this slice; ``parameters`` rank between each source's own and the
    recipe's global ``parameters``.
    """

    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return self.sources[0].layers


@dataclass
class Recipe:
    """A validated recipe.  Build with ``Recipe.from_dict`` / ``Recipe.load``; ``to_dict`` round-trips."""

    method: str
    base_model: str | None
    models: list[ModelEntry]
    parameters: dict[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    config_source: str | None = None
    seed: int = 0
    vocab_mismatch: str = "error"
    name: str | None = None
    # MergeKit's layer slices (frankenmerges, per-slice merges); ``models`` is then empty.
    slices: list[OutputSlice] | None = None

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a YAML recipe; relative model paths are taken relative to the recipe's folder."""
        path = Path(path)
        return cls.from_dict(read_recipe_yaml(path), root=path.parent)

    @classmethod
    def from_dict(cls, data: Any, *, root: str | Path | None = None) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError("a recipe must be a mapping with at least `merge_method` and `models`")
        data = copy.deepcopy(data)
        for key in data:
            if key in UNSUPPORTED_MERGEKIT_KEYS:
                raise RecipeError(
                    f"recipe key {key!r} ({UNSUPPORTED_MERGEKIT_KEYS[key]}) is a MergeKit feature transfuse "
                    "does not support yet; use `models:` or `slices:` with `base_model:` instead"
                )
            if key not in TOP_LEVEL_KEYS:
                raise RecipeError(
                    f"unknown recipe key {key!r}; allowed keys: {', '.join(sorted(TOP_LEVEL_KEYS))}"
                )
        if "merge_method" not in data:
            raise RecipeError("the recipe has no `merge_method`; run `transfuse methods` to list them")
        method = data["merge_method"]
        spec = get_method(str(method))

        def resolve(p: Any, what: str) -> str:
            if not isinstance(p, str) or not p:
                raise RecipeError(f"{what} must be a path string, got {p!r}")
            if root is not None and not Path(p).is_absolute() and (Path(root) / p).exists():
                return str(Path(root) / p)
            return p

        base = data.get("base_model")
        base = resolve(base, "base_model") if base is not None else None

        if ("models" in data) == ("slices" in data):
            raise RecipeError(
                "a recipe needs exactly one of `models:` (whole models) or `slices:` (layer ranges)"
            )
        models: list[ModelEntry] = []
        slices: list[OutputSlice] | None = None
        if "models" in data:
            raw_models = data.get("models")
            if not isinstance(raw_models, list) or not raw_models:
                raise RecipeError("`models` must be a non-empty list of {model: PATH, parameters: {...}}")
            for i, entry in enumerate(raw_models):
                path, lora, params, _ = _parse_input(entry, f"models[{i}]", resolve, slice_source=False)
                stats = entry.get("statistics") if isinstance(entry, dict) else None
                if stats is not None:
                    stats = resolve(stats, f"models[{i}].statistics")
                models.append(ModelEntry(path=path, parameters=params, lora=lora, statistics=stats))
            _refuse_duplicates(models)
        else:
            slices = _parse_slices(data.get("slices"), resolve)
        params = data.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecipeError(f"`parameters` must be a mapping, got {params!r}")

        def dtype_of(key: str) -> str | None:
            value = data.get(key)
            if value is None:
                return None
            if value not in DTYPE_NAMES:
                raise RecipeError(f"`{key}` must be one of {', '.join(DTYPE_NAMES)}, got {value!r}")
            return value

        vocab = data.get("vocab_mismatch", "error")
        if vocab not in VOCAB_MODES:
            raise RecipeError(f"`vocab_mismatch` must be one of {', '.join(VOCAB_MODES)}, got {vocab!r}")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RecipeError(f"`seed` must be an integer, got {seed!r}")
        tokenizer_source = data.get("tokenizer_source")
        if tokenizer_source is not None and tokenizer_source not in ("base", "union"):
            if not isinstance(tokenizer_source, str):
                raise RecipeError(
                    f"`tokenizer_source` must be `base`, `union` or a model path, got {tokenizer_source!r}"
                )
            tokenizer_source = resolve(tokenizer_source, "tokenizer_source")
        tokenizer = None
        if data.get("tokenizer") is not None:
            if tokenizer_source is not None:
                raise RecipeError(
                    "give `tokenizer_source` or a `tokenizer:` block, not both (as in MergeKit)"
                )
            tokenizer = parse_tokenizer_block(data["tokenizer"], resolve)
        chat_template = data.get("chat_template")
        if chat_template is not None and (not isinstance(chat_template, str) or not chat_template.strip()):
            raise RecipeError(
                f"`chat_template` must be a template name, `auto` or a Jinja string, got {chat_template!r}"
            )
        config_source = data.get("config_source")
        if config_source is not None:
            config_source = resolve(config_source, "config_source")

        recipe = cls(
            method=spec.name,
            base_model=base,
            models=models,
            parameters=params,
            dtype=dtype_of("dtype"),
            out_dtype=dtype_of("out_dtype"),
            tokenizer_source=tokenizer_source,
            tokenizer=tokenizer,
            chat_template=chat_template,
            config_source=config_source,
            seed=seed,
            vocab_mismatch=vocab,
            name=data.get("name"),
            slices=slices,
        )
        recipe.validate()
        return recipe

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check method arity and every parameter setting's names, types and ranges (no files are read)."""
        spec = self.spec
        for name, setting in self.parameters.items():
            _check_setting(spec, name, setting, "parameters")
        if self.slices is not None:
            for i, output in enumerate(self.slices):
                self._validate_slice(i, output)
            return
        if spec.needs_base and self.base_model is None:
            raise RecipeError(
                f"method {spec.name!r} needs `base_model` (the model the experts were fine-tuned from)"
            )
        self._check_arity(len(self.task_models), "")
        for entry in self.models:
            _check_per_model_settings(spec, entry.parameters, f"model {entry.label}")

    def _check_arity(self, n: int, where: str) -> None:
        spec = self.spec
        if n < spec.min_models:
            raise RecipeError(
                f"method {spec.name!r} needs at least {spec.min_models} model(s) besides the base{where}, got {n}"
            )
        if spec.max_models is not None and n > spec.max_models:
            raise RecipeError(
                f"method {spec.name!r} takes at most {spec.max_models} model(s) besides the base{where}, got {n}"
            )

    def _validate_slice(self, i: int, output: OutputSlice) -> None:
        spec = self.spec
        where = f" in slices[{i}]"
        if spec.needs_base:
            base = output.base_model or self.base_model
            if base is None:
                raise RecipeError(f"method {spec.name!r} needs `base_model` (top level or{where})")
            if self.slice_base(output) is None:
                raise RecipeError(
                    f"slices[{i}]: the base {base} must be one of the slice's sources (with the layer range to "
                    "take from it), as in MergeKit"
                )
        self._check_arity(len(self.slice_task_sources(output)), where)
        for name, setting in output.parameters.items():
            _check_setting(spec, name, setting, f"slices[{i}].parameters")
        for source in output.sources:
            _check_per_model_settings(spec, source.parameters, f"slices[{i}] source {source.label}")

    def slice_base(self, output: OutputSlice) -> SliceSource | None:
        """The source of ``output`` that is its base model (``None`` for methods without a base)."""
        base = output.base_model or self.base_model
        if base is None or not (self.spec.needs_base or self.spec.base_optional):
            return None
        key = _input_key(base, None)
        return next((s for s in output.sources if _input_key(s.path, s.lora) == key), None)

    def slice_task_sources(self, output: OutputSlice) -> list[SliceSource]:
        """The sources of ``output`` that contribute task vectors (all but its base)."""
        base = self.slice_base(output)
        return [s for s in output.sources if s is not base]

    @property
    def tokenizer_spec(self) -> TokenizerSpec | None:
        """The tokenizer choice as one object: the ``tokenizer:`` block, else ``tokenizer_source``."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_source is not None:
            return TokenizerSpec(source=self.tokenizer_source)
        return None

    @property
    def task_models(self) -> list[ModelEntry]:
        """The models that contribute task vectors: every listed model except the base itself."""
        if self.base_model is None or not (self.spec.needs_base or self.spec.base_optional):
            return list(self.models)
        base = _input_key(self.base_model, None)
        return [m for m in self.models if _input_key(m.path, m.lora) != base]

    def to_dict(self, *, absolute_paths: bool = False) -> dict[str, Any]:
        """The recipe as YAML-ready data.  ``absolute_paths``: local paths made absolute (symlinks kept), so a
        copy stored elsewhere (the output's ``recipe.yaml``) replays from any folder."""

        def where(p: str | None) -> str | None:
            if p is None or not absolute_paths or not Path(p).expanduser().exists():
                return p
            return os.path.abspath(Path(p).expanduser())

        def model(path: str, lora: str | None) -> str | None:
            return f"{where(path)}+{where(lora)}" if lora else where(path)

        out: dict[str, Any] = {"merge_method": self.method}
        if self.base_model is not None:
            out["base_model"] = where(self.base_model)
        if self.slices is not None:
            out["slices"] = []
            for output in self.slices:
                entry: dict[str, Any] = {"sources": []}
                for src in output.sources:
                    item = {"model": model(src.path, src.lora), "layer_range": list(src.layer_range)}
                    entry["sources"].append(
                        {**item, **({"parameters": src.parameters} if src.parameters else {})}
                    )
                if output.base_model is not None:
                    entry["base_model"] = where(output.base_model)
                if output.parameters:
                    entry["parameters"] = output.parameters
                out["slices"].append(entry)
        else:
            out["models"] = [
                {
                    "model": model(m.path, m.lora),
                    **({"parameters": m.parameters} if m.parameters else {}),
                    **({"statistics": where(m.statistics)} if m.statistics else {}),
                }
                for m in self.models
            ]
        if self.parameters:
            out["parameters"] = self.parameters
        for key in ("dtype", "out_dtype", "tokenizer_source", "config_source", "chat_template", "name"):
            value = getattr(self, key)
            if value is not None:
                out[key] = (
                    where(value) if key.endswith("_source") and value not in ("base", "union") else value
                )
        if self.tokenizer is not None:
            out["tokenizer"] = _tokenizer_to_dict(self.tokenizer, where)
        out["seed"] = self.seed
        if self.vocab_mismatch != "error":
            out["vocab_mismatch"] = self.vocab_mismatch
        return out

    def to_yaml(self, *, absolute_paths: bool = False) -> str:
        return yaml.safe_dump(self.to_dict(absolute_paths=absolute_paths), sort_keys=False)


def _tokenizer_to_dict(spec: TokenizerSpec, where: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"source": spec.source if spec.source in ("base", "union") else where(spec.source)}
    if spec.tokens:
        tokens: dict[str, Any] = {}
        for token, setting in spec.tokens.items():
            entry: dict[str, Any] = {}
            src = setting.source
            if src is not None:
                if src.kind == "model":
                    entry["source"] = where(src.model)
                elif src.kind == "zero":
                    entry["source"] = {"kind": "zero"}
                else:
                    which = {"token": src.token} if src.token is not None else {"token_id": src.token_id}
                    entry["source"] = {"kind": "model_token", "model": where(src.model), **which}
            if setting.force:
                entry["force"] = True
            tokens[token] = entry
        out["tokens"] = tokens
    if spec.pad_to_multiple_of is not None:
        out["pad_to_multiple_of"] = spec.pad_to_multiple_of
    return out


def _parse_input(
    entry: Any, where: str, resolve: Any, *, slice_source: bool
) -> tuple[str, str | None, dict[str, Setting], tuple[int, int] | None]:
    """One ``models[]`` entry or slice source -> (path, LoRA path or None, parameters, layer range or None)."""
    if isinstance(entry, str) and not slice_source:
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        raise RecipeError(f"{where} must be a mapping with a `model` key, got {entry!r}")
    allowed = (
        {"model", "parameters", "layer_range"} if slice_source else {"model", "parameters", "statistics"}
    )
    if slice_source and "statistics" in entry:
        raise RecipeError(
            f"{where}: statistics-based merges of layer slices are not supported yet; merge whole models "
            "(`models:`) with `statistics:` files"
        )
    extra = set(entry) - allowed
    if extra:
        raise RecipeError(f"unknown key(s) {sorted(extra)} in {where}; allowed: {', '.join(sorted(allowed))}")
    target = entry["model"]
    if not isinstance(target, str):
        raise RecipeError(f"{where}.model must be a path string, got {target!r}")
    lora = None
    if "+" in target and not Path(target).exists():
        target, lora = target.split("+", 1)
        lora = resolve(lora, f"{where} LoRA")
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise RecipeError(f"{where}.parameters must be a mapping, got {params!r}")
    layer_range = None
    if slice_source:
        layer_range = entry.get("layer_range")
        if (
            not isinstance(layer_range, (list, tuple))
            or len(layer_range) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
            or not 0 <= layer_range[0] < layer_range[1]
        ):
            raise RecipeError(
                f"{where}.layer_range must be [start, end] with 0 <= start < end (end exclusive), got "
                f"{layer_range!r}"
            )
        layer_range = (layer_range[0], layer_range[1])
    return resolve(target, f"{where}.model"), lora, params, layer_range


def _parse_slices(raw: Any, resolve: Any) -> list[OutputSlice]:
    if not isinstance(raw, list) or not raw:
        raise RecipeError("`slices` must be a non-empty list of {sources: [{model, layer_range}, ...]}")
    slices = []
    for i, entry in enumerate(raw):
        where = f"slices[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise RecipeError(f"{where} must be a mapping with a non-empty `sources` list, got {entry!r}")
        extra = set(entry) - {"sources", "base_model", "parameters"}
        if extra:
            raise RecipeError(
                f"unknown key(s) {sorted(extra)} in {where}; allowed: base_model, parameters, sources"
            )
        sources = []
        for j, item in enumerate(entry["sources"]):
            path, lora, params, layer_range = _parse_input(
                item, f"{where}.sources[{j}]", resolve, slice_source=True
            )
            assert layer_range is not None
            sources.append(SliceSource(path=path, layer_range=layer_range, parameters=params, lora=lora))
        lengths = {s.layers for s in sources}
        if len(lengths) > 1:
            raise RecipeError(
                f"{where}: every source must span the same number of layers, got "
                + ", ".join(f"{s.label} ({s.layers})" for s in sources)
            )
        keys = [(_input_key(s.path, s.lora), s.layer_range) for s in sources]
        if len(set(keys)) != len(keys):
            raise DuplicateInputError(f"{where} lists the same model and layer range twice")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecipeError(f"{where}.parameters must be a mapping, got {params!r}")
        base = entry.get("base_model")
        slices.append(
            OutputSlice(
                sources=tuple(sources),
                base_model=resolve(base, f"{where}.base_model") if base is not None else None,
                parameters=params,
            )
        )
    return slices


def _check_per_model_settings(spec: MethodSpec, settings: dict[str, Setting], where: str) -> None:
    for name, setting in settings.items():
        param = spec.param(name)
        if not param.per_model:
            raise ParameterError(
                f"parameter {name!r} of {spec.name!r} is global: set it under the top-level `parameters`, "
                f"not under {where}"
            )
        _check_setting(spec, name, setting, where)


def _input_key(path: str, lora: str | None) -> tuple[str, str | None]:
    """What makes two inputs the same model: their resolved paths (symlinks and ``./`` do not hide a twin)."""

    def real(p: str) -> str:
        q = Path(p).expanduser()
        return os.path.realpath(q) if q.exists() else p

    return real(path), (real(lora) if lora else None)


def _refuse_duplicates(models: list[ModelEntry]) -> None:
    seen: dict[tuple[str, str | None], int] = {}
    for i, entry in enumerate(models):
        key = _input_key(entry.path, entry.lora)
        if key in seen:
            raise DuplicateInputError(
                f"models[{seen[key]}] and models[{i}] are the same model ({entry.label}); listing a model twice "
                "would count its task vector twice. List it once and raise its `weight` instead"
            )
        seen[key] = i


def read_recipe_yaml(path: Path, what: str = "recipe") -> Any:
    """A recipe file's YAML data: named errors for a missing file, a dir, non-UTF-8 text, unreadable files and
    hostile YAML (see ``load_yaml_bounded``)."""
    if not path.is_file():
        why = "is a dir, not a file" if path.is_dir() else "does not exist"
        raise RecipeError(f"{what} file {path} {why}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise RecipeError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return load_yaml_bounded(text, str(path))


def load_yaml_bounded(text: str, where: str = "recipe") -> Any:
    """``yaml.safe_load`` that refuses documents expanding beyond ``MAX_YAML_NODES`` nodes through aliases,
    nested deeper than ``MAX_YAML_DEPTH``, or holding a recursive alias, before constructing anything."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise RecipeError(
                f"{where} is nested too deeply to parse; a recipe is at most {MAX_YAML_DEPTH} levels deep"
            ) from None
        except yaml.YAMLError as exc:
            raise RecipeError(f"{where} is not valid YAML: {exc}") from None
        if node is None:
            return None
        _check_yaml_size(node, where)
        try:
            return loader.construct_document(node)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{where} is not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def _check_yaml_size(root: yaml.Node, where: str) -> None:
    """Count the nodes the document would expand to (each alias counts its whole target again), iteratively and
    memoized by node, so the count itself stays linear in the file's size."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in _yaml_children(node))
            if total > MAX_YAML_NODES:
                raise RecipeError(
                    f"{where} expands to more than {MAX_YAML_NODES:,} YAML nodes (through aliases); a recipe "
                    "needs a few hundred: refusing it"
                )
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise RecipeError(f"{where} holds a recursive YAML alias; a recipe cannot refer to itself")
        if depth > MAX_YAML_DEPTH:
            raise RecipeError(
                f"{where} is nested more than {MAX_YAML_DEPTH} levels deep; a recipe needs < 10"
            )
        on_path.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in _yaml_children(node) if id(c) not in size)


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_setting(spec: MethodSpec, name: str, setting: Setting, where: str) -> None:
    param = spec.param(name)
    label = f"{where}: {name}"
    if isinstance(setting, list):
        if not setting:
            raise ParameterError(f"{label} is an empty list")
        if all(isinstance(e, dict) for e in setting):
            for e in setting:
                extra = set(e) - {"filter", "value"}
                if extra or "value" not in e:
                    raise ParameterError(
                        f"{label}: each filtered entry needs `value` (and optional `filter`), got {e}"
                    )
                if e.get("filter") is not None and not isinstance(e["filter"], str):
                    raise ParameterError(f"{label}: `filter` must be a string, got {e['filter']!r}")
                _check_setting(spec, name, e["value"], where)
            return
        if any(isinstance(e, (dict, list)) for e in setting):
            raise ParameterError(
                f"{label}: a list must be all numbers (a layer gradient) or all {{filter, value}}"
            )
        for e in setting:
            param.validate(e, label)
        return
    if isinstance(setting, dict):
        _check_setting(spec, name, [setting], where)
        return
    param.validate(setting, label)


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> ParamValue | None:
    """Resolve a setting for one tensor: filters by substring, gradients interpolated at layer position ``t``.

    Returns ``None`` when a filter list has no entry for this tensor (the caller falls back to the next scope).
    Interpolation follows MergeKit: ``x = t·(n−1)``, linear between the two neighbouring list values.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(isinstance(e, dict) for e in setting):
        for e in setting:
            f = e.get("filter")
            if f is None or f == "*" or f in tensor_name:
                return evaluate_setting(e["value"], tensor_name, t)
        return None
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]
