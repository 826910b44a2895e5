"""What `jaxlm serve` serves: a jaxlm run (PEFT runs with their adapters) or a Hugging Face directory, with
its tokenizer, chat template and stop tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxlm.data.chat import CHATML, read_template, render
from jaxlm.data.chat import stop_ids as answer_stops
from jaxlm.data.tokenizer import same_vocabulary
from jaxlm.errors import ConfigError, DataError


@dataclasses.dataclass
class Served:
    name: str
    model: object  # a causal TransformerLM
    tokenizer: object
    template: str  # the chat template
    prefix_lm: bool = False

    @property
    def context(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def stop_ids(self) -> frozenset[int]:
        return answer_stops(self.tokenizer)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        special = getattr(self.tokenizer, "special_tokens", {})
        return self.tokenizer.encode(render(self.template, messages, add_generation_prompt=True, **special))


def load_served(path: str | Path, name: str | None = None) -> Served:
    """A run directory (config.yaml), a Hugging Face model directory (config.json + safetensors) or a GGUF file."""
    path = Path(path)
    model, tokenizer, template, prefix_lm = _load(path)
    return Served(name or (path.stem if path.is_file() else path.resolve().name), model, tokenizer, template, prefix_lm)


def load_draft(spec: str, tokenizer):
    """`--draft`: "ngram" (prompt lookup), or a run / Hugging Face directory of a smaller model that reads
    the same tokenizer."""
    if spec == "ngram":
        return "ngram"
    model, draft_tokenizer, _, _ = _load(Path(spec))
    if not same_vocabulary(draft_tokenizer, tokenizer):
        raise ConfigError(
            f"the draft {spec} reads another tokenizer than the model: train it with the model's tokenizer "
            "(the same data.tokenizer settings on the same corpus, or a copy of the model's tokenizer)"
        )
    return model


def _load(path: Path):
    """(model, tokenizer, chat template, prefix_lm) of a run or Hugging Face directory or a GGUF file, checked
    for serving."""
    if path.is_file() and path.suffix == ".gguf":
        from jaxlm.hf.gguf import from_gguf

        model, tokenizer, _ = from_gguf(path)
        template, prefix_lm = tokenizer.chat_template or CHATML, False
    elif not path.is_dir():
        raise DataError(f"model directory not found: {path}")
    elif (path / "config.yaml").is_file():
        from jaxlm.train.run_dir import load_run

        cfg, tokenizer, model, _ = load_run(path)
        template = read_template(cfg.data.chat_template, tokenizer)
        prefix_lm = cfg.train.objective == "prefix_lm"
    elif (path / "config.json").is_file():
        from jaxlm.hf.io import from_hf

        model, tokenizer, _ = from_hf(path)
        if tokenizer is None:
            raise DataError(f"{path} has no tokenizer.json: a served model needs its tokenizer")
        template, prefix_lm = getattr(tokenizer, "chat_template", None) or CHATML, False
    else:
        raise DataError(f"{path} is neither a jaxlm run (config.yaml) nor a Hugging Face model (config.json)")
    cfg = model.cfg
    if cfg.decoder_layers:
        raise ConfigError("jaxlm serve takes decoder-only models; use `jaxlm generate` for encoder-decoders")
    if not cfg.causal:
        raise ConfigError("a bidirectional model (e.g. BERT) cannot generate text")
    if cfg.head != "lm":
        raise ConfigError(f"this model has a {cfg.head!r} head (a reward model scores text, it does not generate)")
    return model, tokenizer, template, prefix_lm
