"""Chat templates: Jinja templates rendered the way transformers' `apply_chat_template` renders them.

A Hugging Face tokenizer ships its template in `tokenizer_config.json` (`chat_template`); jaxlm renders it
in the same sandboxed Jinja environment (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`tojson`, `strftime_now`, the `{% generation %}` block) with the same variables (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, ...). Tokenizers without one use `CHATML`, the
template trl's `setup_chat_format` installs, whose two special tokens are added to the tokenizer.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from jaxlm.errors import ConfigError, DataError

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def stop_ids(tokenizer) -> frozenset[int]:
    """The tokens that end an answer: end of text, and ChatML's turn tokens where the tokenizer has them (a
    turn's end, or the start of another). Serving, generation, RL rollouts and exact match all stop on these."""
    token_id = getattr(tokenizer, "token_id", lambda _: None)
    return frozenset({tokenizer.eos_id} | {i for t in CHATML_TOKENS if (i := token_id(t)) is not None})


@functools.cache
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' {% generation %} ... {% endgeneration %}: renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not parse: {e}") from None


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = False, **special) -> str:
    """The template's text for `messages`; special: bos_token, eos_token, ... as the template expects them."""
    import jinja2

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"chat template failed on these messages: {e}") from None


def read_template(spec: str, tokenizer) -> str:
    """data.chat_template -> template text: auto (the tokenizer's own, else ChatML), chatml, or a file path."""
    if spec == "auto":
        return getattr(tokenizer, "chat_template", None) or CHATML
    if spec == "chatml":
        return CHATML
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.chat_template {spec!r} is neither auto, chatml nor a template file")
    return path.read_text(encoding="utf-8")
