"""Chat templates: finding a checkpoint's Jinja templates, choosing one, and rendering it like transformers.

- `render_chat_template`: transformers' `apply_chat_template(..., tokenize=False)` semantics: a sandboxed
  environment with `trim_blocks` + `lstrip_blocks`, `raise_exception`, `strftime_now`, a non-escaping
  `tojson`, `loopcontrols` and the `{% generation %}` tag; template errors become ValueError.
- `template_files` / `templates_from_config`: the named templates of a checkpoint, from
  `chat_template.jinja` + `additional_chat_templates/*.jinja` or from a config's `chat_template` entry
  (a string, a {name: template} dict or a list of {"name", "template"}).
- `select_chat_template`: which template a call uses (a name, a template string, 'tool_use' with tools, the default).

Policy lives here; the tokenizers in `tokenizer.py` read the files and supply their special tokens.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ---------------------------------------------------------------- rendering


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant mask;
    rendering to a string just keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates want the plain JSON
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def _compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
) -> str:
    """Render a Jinja chat template the way transformers does (sandboxed; errors become ValueError)."""
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"messages[{index}] = {message!r}: each message must be a dict with a 'role'")
    try:
        return _compile_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"chat template error: {exc}") from exc


# ---------------------------------------------------------------- finding and choosing templates


def template_files(directory: Path) -> dict[str, str]:
    """Templates kept as files: chat_template.jinja ('default') and additional_chat_templates/NAME.jinja.
    As in transformers, these replace the tokenizer_config.json entry when present."""
    templates: dict[str, str] = {}
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        templates["default"] = jinja_path.read_text(encoding="utf-8")
    extra_dir = directory / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    return templates


def templates_from_config(raw: Any) -> dict[str, str]:
    """A config's `chat_template` entry as named templates: a string is 'default'; a dict is {name: template};
    a list holds {"name", "template"} entries; anything else (None) gives none."""
    templates: dict[str, str] = {}
    if isinstance(raw, list):
        templates.update((entry["name"], entry["template"]) for entry in raw)
    elif isinstance(raw, dict):
        templates.update(raw)
    elif isinstance(raw, str):
        templates["default"] = raw
    return templates


def select_chat_template(
    templates: dict[str, str],
    default: str | None,
    chat_template: str | None,
    tools: list[dict] | None,
    where: Path,
) -> str | None:
    """The template a call uses: `chat_template` as a name of `templates` or else as a template string; with
    tools and no name, 'tool_use' when there is one; then `default`. None when there is no template at all;
    ValueError when there are several and none is the default."""
    if chat_template in templates:
        return templates[chat_template]
    if chat_template is not None:
        return chat_template
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if default is not None:
        return default
    if templates:
        raise ValueError(
            f"{where}: several chat templates and none named 'default'; pass "
            f"chat_template= one of {sorted(templates)}"
        )
    return None
