"""The MoE recipe: MergeKit's ``mergekit-moe`` YAML, read and validated before any model is opened.

Accepted keys (MergeKit's spelling)::

    base_model: PATH                 # attention, norms, embeddings and LM head come from here
    architecture: mixtral            # optional: mixtral (MixtralForCausalLM) or qwen (Qwen2MoeForCausalLM, needs
                                     # shared_experts); MergeKit's prefix match on its output names
    gate_mode: hidden                # hidden | hidden_avg | cheap_embed | random | uniform_random (MergeKit's),
                                     # hidden_mlp (transfuse's); hidden_last = hidden (MergeKit's synonym)
    dtype: bfloat16                  # output dtype (default: the base's)
    experts_per_token: 2             # Mixtral's num_experts_per_tok
    tokenizer_source: base           # optional; only the base's tokenizer (copied as it is)
    seed: 0                          # transfuse's: random gates and expert noise are seeded from it
    experts:
      - source_model: PATH           # a dense fine-tune of the base (same architecture and shapes)
        positive_prompts: [...]      # needed by every gate mode but random / uniform_random
        negative_prompts: [...]      # optional
        noise_scale: 0.01            # optional: gaussian noise added to this expert's MLP weights
        residual_scale: 1.0          # optional: scales this expert's down_proj
    shared_experts:                  # Qwen2-MoE only: exactly one always-on expert, the same keys as an expert;
      - source_model: PATH           # its prompts give the sigmoid gate `shared_expert_gate` of every layer
        positive_prompts: [...]      # needed by every gate mode but random / uniform_random

The output architecture is chosen as ``mergekit-moe`` chooses it (``select_output_arch``): the outputs whose
MergeKit name (``Mixtral``, ``DeepSeek MoE``, ``Qwen MoE``, ``Qwen3 MoE``) starts with ``architecture``
(case-insensitive; all when absent), then the first that takes the recipe: Mixtral without shared experts, else
DeepSeek MoE for one shared expert without prompts, else Qwen MoE for exactly one shared expert.  transfuse builds
Mixtral and Qwen MoE (Qwen2-MoE); a recipe MergeKit would turn into DeepSeek MoE or Qwen3 MoE is refused by name,
as is every other key.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfuse.dtypes import DTYPE_NAMES
from transfuse.errors import RecipeError
from transfuse.recipe import read_recipe_yaml

# gate_mode -> what the router rows are computed from (docs/moe.md has the formulas).  hidden, hidden_avg,
# cheap_embed, random and uniform_random are MergeKit 0.1.5's (hidden_last: its synonym of hidden); hidden_mlp is
# transfuse's own.
GATE_MODES = {
    "hidden": "each layer's input (the residual stream), last token of the prompt (MergeKit's `hidden`)",
    "hidden_avg": "each layer's input (the residual stream), mean over the prompt's tokens (MergeKit's "
    "`hidden_avg`)",
    "hidden_mlp": "each layer's MLP input (post-attention-layernorm output, what the router sees), mean over the "
    "prompt's tokens (transfuse's; not in MergeKit)",
    "cheap_embed": "the prompts' token embeddings, summed (no forward pass); the same row for every layer",
    "random": "standard normal rows, seeded",
    "uniform_random": "uniform rows in ±1/sqrt(hidden_size) (torch.nn.Linear's initialisation), seeded",
    "hidden_last": "the same as `hidden` (MergeKit 0.1.5 accepts it as a synonym)",
}
HIDDEN_GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "hidden_mlp")  # these run the base
PROMPT_GATE_MODES = (*HIDDEN_GATE_MODES, "cheap_embed")
ARCHITECTURES = ("mixtral", "qwen")  # what transfuse builds: MixtralForCausalLM, Qwen2MoeForCausalLM
# MergeKit 0.1.5's output architectures, lower-cased names in its candidate order (mergekit/moe/__init__.py), and
# what transfuse builds for each (None: refused by name).
MERGEKIT_OUTPUTS = {"mixtral": "mixtral", "deepseek moe": None, "qwen moe": "qwen", "qwen3 moe": None}

TOP_LEVEL_KEYS = {
    "base_model",
    "experts",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "architecture",
    "tokenizer_source",
    "shared_experts",
    "seed",
}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}


@dataclass(frozen=True)
class ExpertEntry:
    """One expert: the model whose MLPs fill one expert slot of every layer, and the prompts routed to it."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass
class MoeRecipe:
    """A validated ``mergekit-moe`` recipe (see the module docstring for the keys)."""

    base_model: str
    experts: list[ExpertEntry]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    architecture: str = "mixtral"  # "mixtral" or "qwen" (Qwen2-MoE)
    seed: int = 0
    shared_experts: list[ExpertEntry] = field(default_factory=list)  # Qwen2-MoE: exactly one
    source: Path | None = field(default=None, compare=False)  # the recipe file, when read from one

    @classmethod
    def load(cls, path: str | Path) -> MoeRecipe:
        """Read a YAML recipe file; relative model paths are taken relative to its folder (else as given)."""
        path = Path(path)
        recipe = cls.from_dict(read_recipe_yaml(path, "MoE recipe"), root=path.parent)
        recipe.source = path
        return recipe

    @classmethod
    def from_dict(cls, data: Any, *, root: str | Path | None = None) -> MoeRecipe:
        if not isinstance(data, dict):
            raise RecipeError("a MoE recipe must be a mapping with at least `base_model` and `experts`")
        data = copy.deepcopy(data)
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                raise RecipeError(
                    f"unknown MoE recipe key {key!r}; allowed keys: {', '.join(sorted(TOP_LEVEL_KEYS))}"
                )

        def resolve(p: Any, what: str) -> str:
            if not isinstance(p, str) or not p:
                raise RecipeError(f"{what} must be a path string, got {p!r}")
            if root is not None and not Path(p).is_absolute() and (Path(root) / p).exists():
                return str(Path(root) / p)
            return p

        if "base_model" not in data:
            raise RecipeError(
                "the MoE recipe has no `base_model` (attention, norms and embeddings come from it)"
            )
        base = resolve(data["base_model"], "base_model")

        gate_mode = data.get("gate_mode", "hidden")
        if gate_mode not in GATE_MODES:
            raise RecipeError(
                f"gate_mode {gate_mode!r} is not supported; choose one of {', '.join(GATE_MODES)}"
            )

        dtype = data.get("dtype")
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise RecipeError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")

        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise RecipeError(f"seed must be a whole number >= 0, got {seed!r}")

        tokenizer_source = data.get("tokenizer_source")
        if tokenizer_source is not None and tokenizer_source != "base":
            if not isinstance(tokenizer_source, str) or not _same_path(resolve(tokenizer_source, "x"), base):
                raise RecipeError(
                    f"tokenizer_source {tokenizer_source!r}: a MoE keeps the base's vocabulary (its embeddings "
                    "come from the base), so only `tokenizer_source: base` is accepted; remove the key"
                )

        raw_experts = data.get("experts")
        if not isinstance(raw_experts, list) or not raw_experts:
            raise RecipeError(
                "`experts` must be a non-empty list of {source_model: PATH, positive_prompts: [...]}"
            )
        experts = [_parse_expert(e, i, resolve) for i, e in enumerate(raw_experts)]
        raw_shared = data.get("shared_experts")
        if raw_shared is not None and not isinstance(raw_shared, list):
            raise RecipeError(
                "`shared_experts` must be a list of {source_model: PATH, positive_prompts: [...]} (one for Qwen2-MoE)"
            )
        shared = [
            _parse_expert(e, i, resolve, where="shared_experts") for i, e in enumerate(raw_shared or [])
        ]
        architecture = select_architecture(data.get("architecture"), shared)

        k = data.get("experts_per_token", 2)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RecipeError(f"experts_per_token must be a whole number >= 1, got {k!r}")
        if k > len(experts):
            raise RecipeError(
                f"experts_per_token is {k} but the recipe lists only {len(experts)} expert(s); route each token "
                f"to at most {len(experts)}"
            )
        recipe = cls(
            base_model=base,
            experts=experts,
            gate_mode=gate_mode,
            dtype=dtype,
            experts_per_token=k,
            architecture=architecture,
            seed=seed,
            shared_experts=shared,
        )
        recipe.check_prompts()
        return recipe

    def check_prompts(self) -> None:
        """Prompt-based gates need positive prompts for every expert, and not the same prompts for all."""
        if self.gate_mode not in PROMPT_GATE_MODES:
            return
        for i, expert in enumerate(self.experts):
            if not expert.positive_prompts:
                raise RecipeError(
                    f"experts[{i}] ({expert.source_model}) has no positive_prompts; gate_mode {self.gate_mode!r} "
                    "computes its router row from them (or use gate_mode: random)"
                )
        for i, expert in enumerate(self.shared_experts):
            if not expert.positive_prompts:
                raise RecipeError(
                    f"shared_experts[{i}] ({expert.source_model}) has no positive_prompts; gate_mode "
                    f"{self.gate_mode!r} computes its shared_expert_gate row from them (MergeKit's qwen output "
                    "needs them too), or use gate_mode: random"
                )
        first = (self.experts[0].positive_prompts, self.experts[0].negative_prompts)
        if len(self.experts) > 1 and all(
            (e.positive_prompts, e.negative_prompts) == first for e in self.experts[1:]
        ):
            raise RecipeError(
                "every expert has the same positive and negative prompts, so every router row would be the same "
                "and routing would not tell the experts apart; give each expert prompts of what it should get"
            )

    def to_dict(self) -> dict[str, Any]:
        """The recipe as MergeKit's YAML schema (plus ``seed``), paths absolute."""

        def expert(e: ExpertEntry) -> dict[str, Any]:
            out: dict[str, Any] = {"source_model": _absolute(e.source_model)}
            if e.positive_prompts:
                out["positive_prompts"] = list(e.positive_prompts)
            if e.negative_prompts:
                out["negative_prompts"] = list(e.negative_prompts)
            if e.noise_scale is not None:
                out["noise_scale"] = e.noise_scale
            if e.residual_scale is not None:
                out["residual_scale"] = e.residual_scale
            return out

        data: dict[str, Any] = {
            "base_model": _absolute(self.base_model),
            "architecture": self.architecture,
            "gate_mode": self.gate_mode,
        }
        if self.dtype is not None:
            data["dtype"] = self.dtype
        data["experts_per_token"] = self.experts_per_token
        data["seed"] = self.seed
        data["experts"] = [expert(e) for e in self.experts]
        if self.shared_experts:
            data["shared_experts"] = [expert(e) for e in self.shared_experts]
        return data

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def select_architecture(architecture: Any, shared: list[ExpertEntry]) -> str:
    """The output ``mergekit-moe`` would build for this recipe, as transfuse names it (``mixtral`` / ``qwen``).

    MergeKit keeps the outputs whose name starts with ``architecture`` (all when it is absent or empty), then takes
    Mixtral if it accepts the recipe (no shared experts), else the first of the rest that does (DeepSeek MoE: at
    most one shared expert, without prompts; Qwen MoE: exactly one; Qwen3 MoE: none, Qwen3 inputs).  The input
    models' types (checked when the models are opened) can only rule an output out, never pick another."""
    if architecture is not None and not isinstance(architecture, str):
        raise RecipeError(f"architecture must be a string such as 'mixtral' or 'qwen', got {architecture!r}")
    prefix = (architecture or "").lower()
    candidates = [name for name in MERGEKIT_OUTPUTS if name.startswith(prefix)]
    if not candidates:
        raise RecipeError(
            f"MoE output architecture {architecture!r} matches none of MergeKit's outputs (Mixtral, DeepSeek MoE, "
            "Qwen MoE, Qwen3 MoE); transfuse builds 'mixtral' and 'qwen' (Qwen2-MoE)"
        )
    if not shared:
        if "mixtral" in candidates:
            return "mixtral"
        if "qwen moe" in candidates:
            raise RecipeError(
                f"architecture {architecture!r} (Qwen2-MoE) needs exactly one shared expert: add shared_experts: "
                "[{source_model: PATH, positive_prompts: [...]}] (MergeKit's qwen output takes exactly one)"
            )
        raise RecipeError(
            f"MoE output architecture {architecture!r} is not supported: MergeKit's DeepSeek MoE and Qwen3 MoE "
            "outputs are not built by transfuse; use architecture: mixtral, or qwen with one shared expert"
        )
    if len(shared) != 1:
        raise RecipeError(
            f"the recipe lists {len(shared)} shared_experts; a Qwen2-MoE has exactly one shared expert (MergeKit's "
            "qwen and deepseek outputs take at most one): keep one"
        )
    if "qwen moe" not in candidates:
        raise RecipeError(
            f"architecture {architecture!r} has no shared expert (Mixtral) or is not built by transfuse (DeepSeek "
            "MoE, Qwen3 MoE); for a MoE with shared_experts use architecture: qwen (Qwen2-MoE)"
        )
    if "deepseek moe" in candidates and not (shared[0].positive_prompts or shared[0].negative_prompts):
        raise RecipeError(
            "shared_experts[0] has no prompts and the recipe names no architecture: mergekit-moe builds a DeepSeek "
            "MoE (an ungated shared expert) from this recipe, which transfuse does not; set architecture: qwen "
            "for a Qwen2-MoE (its shared expert has a gate, from positive_prompts unless gate_mode: random)"
        )
    return "qwen"


def _parse_expert(entry: Any, i: int, resolve: Any, where: str = "experts") -> ExpertEntry:
    where = f"{where}[{i}]"
    if not isinstance(entry, dict):
        raise RecipeError(f"{where} must be a mapping {{source_model: PATH, positive_prompts: [...]}}")
    for key in entry:
        if key not in EXPERT_KEYS:
            raise RecipeError(
                f"unknown key {key!r} in {where}; allowed keys: {', '.join(sorted(EXPERT_KEYS))}"
            )
    if "source_model" not in entry:
        raise RecipeError(f"{where} has no source_model")
    prompts = {}
    for key in ("positive_prompts", "negative_prompts"):
        value = entry.get(key)
        if value is None:
            prompts[key] = ()
            continue
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            raise RecipeError(f"{where}.{key} must be a list of non-empty strings, got {value!r}")
        prompts[key] = tuple(value)
    scales = {}
    for key in ("noise_scale", "residual_scale"):
        value = entry.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise RecipeError(f"{where}.{key} must be a finite number, got {value!r}")
        if key == "noise_scale" and value is not None and value < 0:
            raise RecipeError(f"{where}.noise_scale must be >= 0, got {value!r}")
        scales[key] = float(value) if value is not None else None
    return ExpertEntry(
        source_model=resolve(entry["source_model"], f"{where}.source_model"),
        positive_prompts=prompts["positive_prompts"],
        negative_prompts=prompts["negative_prompts"],
        noise_scale=scales["noise_scale"],
        residual_scale=scales["residual_scale"],
    )


def _absolute(p: str) -> str:
    path = Path(p).expanduser()
    return str(path.resolve()) if path.exists() else p


def _same_path(a: str, b: str) -> bool:
    import os

    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def load_moe_recipe(recipe: MoeRecipe | dict[str, Any] | str | Path) -> MoeRecipe:
    """A ``MoeRecipe`` from itself, a dict (MergeKit's schema) or a YAML file path."""
    if isinstance(recipe, MoeRecipe):
        return recipe
    if isinstance(recipe, dict):
        return MoeRecipe.from_dict(recipe)
    return MoeRecipe.load(recipe)
