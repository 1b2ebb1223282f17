"""The chat template a merged model's tokenizer gets (mergekit's ``chat_template``): a built-in one by name, the most
common template among the merged models (``"auto"``), or a Jinja template given as text.

The built-in templates render as mergekit 0.1.5's of the same name under transformers' chat-template environment
(trim_blocks, lstrip_blocks), checked conversation by conversation in the oracle tests:
- ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message; the generation prompt
  ``<|im_start|>assistant\\n``;
- ``llama3``: ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content, trimmed}<|eot_id|>\\n`` per message, the first
  after ``bos_token``; the prompt ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``;
- ``alpaca``: the last system message (trimmed), a blank line, then ``### Instruction:`` / ``### Response:`` /
  ``### Input:`` blocks for user / assistant / user_context messages (trimmed, a blank line between), system
  messages left out of the blocks; the prompt ``### Response:\\n`` unless the last message is the assistant's;
- ``mistral``: ``bos_token``, then `` [INST] {user} [/INST]`` (the optional leading system message before the first
  user turn, then a blank line) and `` {assistant}{eos_token}``; roles must alternate user/assistant.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from nbmerge.errors import ParameterError, shown
from nbmerge.io.untrusted import model_json, model_text

BUILT_IN = {
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"),
    "llama3": (
        "{%- for message in messages -%}"
        "{{- (bos_token if loop.first else '') ~ '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n'"
        " ~ (message['content'] | trim) ~ '<|eot_id|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"),
    "alpaca": (
        "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{{- (systems | last).content | trim if systems else '' -}}{{- '\\n\\n' -}}"
        "{%- set headings = {'user': 'Instruction', 'assistant': 'Response', 'user_context': 'Input'} -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] in headings -%}"
        "{{- '### ' ~ headings[message['role']] ~ ':\\n' ~ (message['content'] | trim) -}}"
        "{%- if not loop.last -%}{{- '\\n\\n' -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{- '### Response:\\n' -}}"
        "{%- endif -%}"),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system_message = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
        "{{- bos_token -}}"
        "{%- for message in turns -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{- raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') -}}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- ' [INST] ' ~ (system_message ~ '\\n\\n' if loop.first and system_message is defined else '')"
        " ~ message['content'] ~ ' [/INST]' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- ' ' ~ message['content'] ~ eos_token -}}"
        "{%- else -%}"
        "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
        "optional system message!') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"),
}


def read_chat_template(folder: Path | None) -> str | None:
    """A model folder's chat template: chat_template.jinja, chat_template.json or tokenizer_config.json's entry
    (of a list of named templates, the "default" one); None where it has none."""
    if folder is None:
        return None
    where = f"chat_template of {folder}"
    text = model_text(folder, "chat_template.jinja", where)
    if text is not None:
        return text
    for name, key in (("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")):
        settings = model_json(folder, name, where)
        template = settings.get(key) if isinstance(settings, dict) else None
        if isinstance(template, list):
            template = next((entry.get("template") for entry in template if isinstance(entry, dict)
                             and entry.get("name") == "default"), None)
        if isinstance(template, str) and template:
            return template
    return None


def choose_chat_template(value: str | None, folders: list[Path | None]) -> str | None:
    """The template text for ``value``: a built-in name, "auto" (the most common of the models' templates,
    stripped; None when none has one), or Jinja text (at least 20 characters with a ``{``)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ParameterError(f"chat_template: expected a template name, 'auto' or Jinja text, got {shown(value)}")
    if value == "auto":
        templates = [template.strip() for template in map(read_chat_template, folders) if template]
        return Counter(templates).most_common(1)[0][0] if templates else None
    if value in BUILT_IN:
        return BUILT_IN[value]
    if len(value) < 20 or "{" not in value:
        raise ParameterError(f"chat_template: {shown(value)} is neither a built-in template ({', '.join(BUILT_IN)}), "
                             f"nor 'auto', nor Jinja text")
    return value
