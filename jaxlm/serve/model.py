"""What `jaxlm serve` serves: a jaxlm run (PEFT runs with their adapters) or a Hugging Face directory, with
its tokenizer, chat template and stop tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxlm.data.chat import render
from jaxlm.data.chat import stop_ids as answer_stops
from jaxlm.data.tokenizer import same_vocabulary
from jaxlm.errors import ConfigError
from jaxlm.train.run_dir import load_model_dir


@dataclasses.dataclass
class Served:
    name: str
    model: object  # a causal TransformerLM
    tokenizer: object
    template: str  # the chat template
    prefix_lm: bool = False
    adapters: tuple[str, ...] = ()  # LoRA adapters served on the model (`jaxlm.serve.adapters`), by name

    def __post_init__(self):
        self.cfg = self.model.cfg  # kept when the model is released

    def adapter(self, name: str) -> int | None:
        """The engine's adapter index of model `name`: 0 the base, i the i-th adapter; None if not served."""
        if name == self.name:
            return 0
        return self.adapters.index(name) + 1 if name in self.adapters else None

    @property
    def context(self) -> int:
        return self.cfg.max_seq_len

    def release_model(self) -> None:
        """Drops the model once an engine holds its weights (`DecodeSteps` keeps each layer's own buffers):
        the stacked copy would double the weights' memory (SmolLM2-135M: 0.4 GB). `cfg` stays."""
        self.model = None

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
    draft = load_model_dir(spec, what="the draft model (--draft)", generates=True)
    model, draft_tokenizer = draft.model, draft.tokenizer
    if not same_vocabulary(draft_tokenizer, tokenizer):
        raise ConfigError(
            f"the draft {spec} reads another tokenizer than the model: train it with the model's tokenizer "
            "(the same data.tokenizer settings on the same corpus, or a copy of the model's tokenizer)"
        )
    return model


def _load(path: Path):
    """(model, tokenizer, chat template, prefix_lm) of a run or Hugging Face directory or a GGUF file, checked
    for serving."""
    loaded = load_model_dir(path, what="jaxlm serve", generates=True)
    if loaded.model.cfg.decoder_layers:
        raise ConfigError("jaxlm serve takes decoder-only models; use `jaxlm generate` for encoder-decoders")
    return loaded.model, loaded.tokenizer, loaded.template, loaded.prefix_lm
