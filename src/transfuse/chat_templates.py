"""Named chat templates for a merged model's tokenizer (the recipe's ``chat_template:``).

``chat_template`` is a name below, ``auto`` (the template most of the inputs already use, ties to the first
input in recipe order; nothing changes when none has one), or a Jinja string containing ``{%`` or ``{{``,
used as given.  Templates follow each format's published conversation layout, written here for transfuse.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from transfuse.errors import RecipeError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

MISTRAL = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% endif %}"
    "{% endfor %}"
)

ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA, "mistral": MISTRAL, "zephyr": ZEPHYR}


def resolve_chat_template(setting: str, input_templates: Sequence[str | None]) -> str | None:
    """The Jinja template for ``setting``; ``None`` for ``auto`` when no input has a template."""
    if setting == "auto":
        used = [t for t in input_templates if t]
        if not used:
            return None
        counts = Counter(used)
        best = max(counts.values())
        return next(t for t in used if counts[t] == best)
    if setting in TEMPLATES:
        return TEMPLATES[setting]
    if "{%" in setting or "{{" in setting:
        return setting
    raise RecipeError(
        f"chat_template {setting!r} is neither a known name ({', '.join(sorted(TEMPLATES))}, auto) nor a Jinja "
        "template (it holds no {% or {{)"
    )
