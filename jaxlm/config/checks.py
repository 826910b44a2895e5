"""The checks that span sections of a `Config`, one named function each: `Config.__post_init__` derives the
model's dtype and critic (`derived_model`), then runs `CROSS_SECTION` in order. Each raises `ConfigError`
naming the keys at fault. Each takes the `Config` being built."""

from __future__ import annotations

import dataclasses

from jaxlm.config.model import ModelConfig
from jaxlm.config.sections import (
    ALIGNMENT_OBJECTIVES,
    INSTRUCTION_OBJECTIVES,
    PRECISION_DTYPES,
    RL_OBJECTIVES,
    DataConfig,
)
from jaxlm.errors import ConfigError

# The model kind each objective trains.
OBJECTIVE_KINDS = {
    "clm": "decoder",
    "mlm": "encoder",
    "span": "encoder-decoder",
    "seq2seq": "encoder-decoder",
    **dict.fromkeys(INSTRUCTION_OBJECTIVES + ALIGNMENT_OBJECTIVES, "decoder"),
}


def model_kind(model: ModelConfig) -> str:
    """decoder | encoder | encoder-decoder."""
    return "encoder-decoder" if model.decoder_layers else "decoder" if model.causal else "encoder"


def derived_model(cfg) -> ModelConfig:
    """The model with what the run decides and the config left out: model.dtype from train.precision, PPO's
    critic (model.value_head). An explicit value contrary to the run is refused, never rewritten."""
    model = cfg.model
    want = PRECISION_DTYPES[cfg.train.precision]  # train.precision is the one knob; model.dtype records it
    if model.dtype != want:
        if model.dtype != "float32" or "model.dtype" in cfg.given:
            raise ConfigError(
                f"model.dtype={model.dtype} conflicts with train.precision={cfg.train.precision}; "
                f"set the training precision with train.precision (fp32 | bf16 | fp16) alone"
            )
        model = dataclasses.replace(model, dtype=want)
    if cfg.train.objective == "ppo" and not model.value_head:  # PPO's critic
        if "model.value_head" in cfg.given:
            raise ConfigError("train.objective=ppo trains a critic (model.value_head=true); got model.value_head=false")
        model = dataclasses.replace(model, value_head=True)
    return model


def objective_fits_model(cfg) -> None:
    want, kind = OBJECTIVE_KINDS[cfg.train.objective], model_kind(cfg.model)
    if want != kind:
        raise ConfigError(
            f"train.objective={cfg.train.objective} trains an {want}, but the model is an "
            f"{kind}: clm for causal decoders, mlm for encoders (model.causal=false), span or seq2seq for "
            "encoder-decoders (model.decoder_layers > 0)"
        )


def z_loss_has_a_softmax(cfg) -> None:
    objective = cfg.train.objective
    if objective in ALIGNMENT_OBJECTIVES and cfg.train.z_loss:
        raise ConfigError(
            f"train.z_loss regularizes the softmax of next-token cross-entropy (clm, sft, prefix_lm, mlm, "
            f"span, seq2seq); train.objective={objective} has no such loss, so the setting would do nothing"
        )


def heads_fit_objective(cfg) -> None:
    objective, model = cfg.train.objective, cfg.model
    if (objective == "reward") != (model.head == "score"):
        raise ConfigError(
            "train.objective=reward trains a reward model (model.head=score), and a model.head=score model "
            f"trains with train.objective=reward; got objective={objective}, head={model.head}"
        )
    if objective == "reward" and model.num_labels != 1:
        raise ConfigError(f"a reward model scores with one value: model.num_labels=1, got {model.num_labels}")
    if model.value_head and (model.head != "lm" or model_kind(model) != "decoder"):
        raise ConfigError("model.value_head adds a critic to a causal language model (head=lm, a decoder)")


def rollouts_fit(cfg) -> None:
    """ppo/grpo: a reward, groups, minibatches and room for the response."""
    objective, align = cfg.train.objective, cfg.align
    if objective not in RL_OBJECTIVES:
        return
    if not align.reward:
        raise ConfigError(
            f"train.objective={objective} needs align.reward: a reward-model run directory or a Python "
            "function module:function (e.g. jaxlm.rewards:passage_name)"
        )
    if objective == "ppo" and align.group != 1:
        raise ConfigError("align.group > 1 samples several responses per prompt for grpo; ppo takes 1")
    if objective == "grpo" and align.group < 2:
        raise ConfigError("grpo compares the samples of a prompt: align.group must be >= 2")
    rows = cfg.train.batch_size * align.group
    if rows % align.minibatches or (rows // align.minibatches) % cfg.train.grad_accum:
        raise ConfigError(
            f"a rollout batch of train.batch_size x align.group = {rows} responses must split into "
            f"align.minibatches ({align.minibatches}) of a multiple of train.grad_accum "
            f"({cfg.train.grad_accum}) rows"
        )
    if align.response_len >= cfg.data.seq_len:
        raise ConfigError(
            f"align.response_len ({align.response_len}) must leave room for the prompt in "
            f"data.seq_len ({cfg.data.seq_len})"
        )


def alignment_has_a_base(cfg) -> None:
    objective = cfg.train.objective
    if objective not in ALIGNMENT_OBJECTIVES:
        return
    if not cfg.finetune.init_from:
        raise ConfigError(
            f"train.objective={objective} starts from a trained model: set finetune.init_from to a jaxlm "
            "run directory, a Hugging Face model directory or a GGUF file"
        )
    if cfg.peft.method in ("prompt", "prefix"):
        raise ConfigError(
            f"train.objective={objective} takes peft.method none, lora or qlora (the reference is the "
            f"model with its adapters off), not {cfg.peft.method}"
        )


def peft_fits_model(cfg) -> None:
    method, kind = cfg.peft.method, model_kind(cfg.model)
    experts_adapted = cfg.model.num_experts and {"gate", "up", "down"} & set(cfg.peft.targets)
    if method in ("lora", "qlora") and experts_adapted:
        if cfg.peft.dropout:
            raise ConfigError("peft.dropout is not applied inside the experts: set it to 0 with gate/up/down targets")
    if method in ("prompt", "prefix") and kind != "decoder":
        raise ConfigError(f"peft.method={method} adapts decoders; this model is an {kind}")
    if method == "prompt" and cfg.model.position == "learned":
        if cfg.data.seq_len + cfg.peft.virtual_tokens > cfg.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({cfg.data.seq_len}) + peft.virtual_tokens ({cfg.peft.virtual_tokens}) exceed "
                f"the learned position table (model.max_seq_len {cfg.model.max_seq_len})"
            )
    packed = cfg.data.document_mask or (cfg.train.objective in INSTRUCTION_OBJECTIVES and cfg.data.pack)
    if method in ("prompt", "prefix") and packed:
        raise ConfigError(
            f"peft.method={method} puts its virtual tokens before each row, so a row holds one example: "
            "set data.pack=false (and data.document_mask=false)"
        )
    if method != "none" and cfg.mesh.pipeline != 1:
        raise ConfigError("peft methods run without pipeline parallelism; use mesh.pipeline=1")


def mixture_fits(cfg) -> None:
    """A mixture replaces data.source, for text objectives."""
    if not cfg.data.mixture:
        return
    if cfg.train.objective not in ("clm", "mlm"):
        raise ConfigError(f"data.mixture mixes packed text (train.objective clm or mlm), not {cfg.train.objective}")
    if "data.source" in cfg.given and cfg.data.source != DataConfig.source:  # the default, as configs/ write it
        raise ConfigError(f"set data.source ({cfg.data.source!r}) or data.mixture, not both")


def layout_fits(cfg) -> None:
    """Packing, pipeline and sequence length against the model."""
    if cfg.data.document_mask and cfg.train.objective != "clm":
        raise ConfigError("data.document_mask applies to packed text (train.objective=clm)")
    if cfg.model.decoder_layers and cfg.mesh.pipeline != 1:
        raise ConfigError("pipeline parallelism supports single-stack models; use mesh.pipeline=1")
    m = cfg.model
    if m.router_balance_rate and cfg.peft.method != "none":
        raise ConfigError("model.router_balance_rate moves the base model's balancing bias: set it to 0 with peft")
    if (m.aux_loss_weight or m.router_z_loss_weight or m.router_balance_rate) and cfg.mesh.pipeline != 1:
        raise ConfigError(
            "model.aux_loss_weight / router_z_loss_weight / router_balance_rate: the routers' statistics are not "
            "collected through the pipeline schedule; use mesh.pipeline=1 or set them to 0"
        )
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    # An explicit tile longer than the sequence is a mistake; the default is capped at the sequence silently.
    if (
        m.attention_impl == "blockwise"
        and m.attention_block > cfg.data.seq_len
        and "model.attention_block" in cfg.given
    ):
        raise ConfigError(
            f"model.attention_block ({m.attention_block}) exceeds data.seq_len ({cfg.data.seq_len}): one tile would "
            "hold every sequence (use the reference attention, or a smaller block)"
        )
    context_fits(cfg)


def context_fits(cfg) -> None:
    """Context parallelism: ring attention over blockwise tiles, decoder-only or encoder models, whole chunks."""
    C, m = cfg.mesh.context, cfg.model
    if C == 1:
        return
    if m.attention_impl != "blockwise":
        raise ConfigError(
            f"mesh.context={C} runs ring attention over blockwise tiles: set model.attention_impl=blockwise"
        )
    if m.decoder_layers:
        raise ConfigError(f"mesh.context={C} splits decoder-only and encoder models, not encoder-decoders")
    if cfg.mesh.pipeline != 1 or cfg.mesh.expert != 1:
        raise ConfigError(f"mesh.context={C} does not yet combine with mesh.pipeline or mesh.expert: use one of them")
    if m.attention_dropout:
        raise ConfigError(f"mesh.context={C}: ring attention has no attention dropout (model.attention_dropout)")
    if cfg.peft.method in ("prompt", "prefix"):
        raise ConfigError(f"mesh.context={C} does not run {cfg.peft.method} tuning's virtual tokens")
    if cfg.data.seq_len % (2 * C):
        raise ConfigError(
            f"data.seq_len ({cfg.data.seq_len}) must be a multiple of 2 x mesh.context ({2 * C}): the zig-zag "
            "layout gives each device two of 2C equal chunks"
        )


# In the order the messages should win when several apply.
CROSS_SECTION = (
    objective_fits_model,
    z_loss_has_a_softmax,
    heads_fit_objective,
    rollouts_fit,
    alignment_has_a_base,
    peft_fits_model,
    mixture_fits,
    layout_fits,
)
