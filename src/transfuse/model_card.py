"""The README.md model card written into a merged model, in the shape the Hugging Face Hub reads.

YAML front matter (``base_model``: the Hub ids of the inputs, when they have one; ``tags``: ``merge``,
``transfuse`` and the method; ``library_name``), then what was merged, how, and the recipe itself, so the card
alone reproduces the model.  Like MergeKit's card, local paths are not Hub ids and are left out of ``base_model``;
an input whose ``config.json`` records a Hub id in ``_name_or_path`` contributes that id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from transfuse._version import __version__
from transfuse.plan import MergePlan

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(path: str) -> str | None:
    """The Hub id a model input stands for: the path itself when it looks like ``org/name`` and is not a local
    path, else its config's ``_name_or_path`` when that does; ``None`` otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        return path if _HUB_ID.match(path) else None
    config = (p if p.is_dir() else p.parent) / "config.json"
    try:
        named = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(named, str) and _HUB_ID.match(named) and not Path(named).expanduser().exists():
        return named
    return None


def render_model_card(plan: MergePlan, recipe_yaml: str, name: str | None = None) -> str:
    """The model card of ``plan``'s output; ``recipe_yaml`` is the recipe as stored next to the weights."""
    recipe = plan.recipe
    spec = plan.spec
    base = recipe.base_model if spec.needs_base else None
    inputs: list[str] = []
    if recipe.slices is not None:
        for output in recipe.slices:
            inputs += [s.label for s in output.sources if s.path != base]
    else:
        inputs = [m.label for m in recipe.models if m.path != base]
    inputs = list(dict.fromkeys(inputs))
    everything = ([base] if base else []) + [i.split("+")[0].split("[")[0] for i in inputs]
    bases = sorted({h for h in (hub_id(p) for p in everything) if h})
    metadata = {
        "base_model": bases,
        "tags": ["merge", "transfuse", spec.name],
        "library_name": "transformers",
    }
    title = name or recipe.name or f"{spec.name} merge of {len(inputs)} model(s)"
    using = f", with {_show(base)} as the base" if base else ""
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).rstrip(),
        "---",
        f"# {title}",
        "",
        f"This model was merged with [transfuse](https://pypi.org/project/transfuse/) {__version__}.",
        "",
        "## Merge details",
        "",
        f"Method: **{spec.name}**{using}. {spec.summary}",
        "",
        f"Paper: {spec.paper}",
        "",
        "Models merged:",
        "",
        *[f"* {_show(i)}" for i in inputs],
        "",
        "## Recipe",
        "",
        "Replay it with `transfuse merge recipe.yaml OUT_DIR` (the file is stored next to the weights):",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _show(path: str) -> str:
    found = hub_id(path.split("+")[0].split("[")[0])
    return f"[{found}](https://huggingface.co/{found}) ({path})" if found else f"`{path}`"
