"""Typed configuration: frozen dataclasses are the schema, YAML files are instances.

`load_config("configs/llama_tiny.yaml", ["model.num_layers=4"])` reads the YAML,
applies dotted `key=value` overrides (values parsed as YAML scalars), and builds
`Config`. Unknown keys, wrong types and impossible combinations raise
`ConfigError` naming the key, before any model is built or compiled.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxlm.choices import (
    ACTIVATIONS,
    ATTENTION_IMPLS,
    HEADS,
    MLPS,
    NORM_POSITIONS,
    NORMS,
    POSITIONS,
    REMAT,
    ROPE_SCALINGS,
)
from jaxlm.errors import ConfigError
from jaxlm.presets import PRESET_FIELDS


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Transformer shape and wiring. GPT-2, LLaMA, Mistral, Qwen2/3, Gemma 2/3, Phi-3, BERT and T5 are instances.

    Every field acts in every model class (decoder, encoder, encoder-decoder), or is refused where it cannot.
    """

    vocab_size: int = 256  # embedding rows; must be >= the tokenizer's vocabulary
    d_model: int = 128  # D, residual width
    num_layers: int = 4  # L
    num_heads: int = 4  # N, query heads
    num_kv_heads: int = 0  # K, key/value heads (0 = num_heads: MHA; 1 = MQA)
    head_dim: int = 0  # H (0 = d_model // num_heads)
    mlp_dim: int = 512  # F, hidden width of the feed-forward block
    max_seq_len: int = 256  # longest context (learned positions, KV cache size)
    position: str = "rope"  # rope | learned | sinusoidal | alibi | relative (T5 bias) | none
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | linear | dynamic | yarn | llama3 (Hugging Face's rope_scaling types)
    rope_factor: float = 1.0  # context extension factor of the scaling
    rope_original_max_len: int = 0  # pre-training context (HF original_max_position_embeddings)
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: float = 0.0  # yarn (0 = 0.1 ln(factor) + 1); longrope (0 = sqrt(1 + ln f / ln L0))
    rope_short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors within rope_original_max_len
    rope_long_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors beyond it
    rope_local_theta: float = 0.0  # RoPE base of the sliding-window layers, unscaled (Gemma 3); 0 = rope_theta
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + scale); Gemma: 1, its scales start at 0
    post_norms: bool = False  # also normalise each branch's output before the residual sum (Gemma 2/3)
    qk_norm: bool = False  # RMSNorm over head_dim of queries and keys, before RoPE (Qwen3, Gemma 3)
    norm_position: str = "pre"  # pre (GPT-2, LLaMA) | post (original Transformer)
    mlp: str = "gated"  # gated (SwiGLU with activation=silu) | plain
    activation: str = "silu"  # silu | gelu | gelu_tanh | relu
    qkv_bias: bool = False  # bias on q/k/v projections (GPT-2, Qwen2)
    out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # biases in the feed-forward block (GPT-2)
    norm_bias: bool = True  # LayerNorm bias (ignored by rmsnorm)
    tie_embeddings: bool = False  # logits reuse the token embedding
    sliding_window: int = 0  # attend to the last N keys only (0 = full causal); bidirectional: |q - k| < N
    global_every: int = 0  # with sliding_window: layers n-1, 2n-1, ... attend globally (Gemma 2: 2, Gemma 3: 6)
    attn_logit_softcap: float = 0.0  # attention scores -> c * tanh(scores / c) (Gemma 2); 0 = off
    final_logit_softcap: float = 0.0  # logits -> c * tanh(logits / c) (Gemma 2/3); 0 = off
    causal: bool = True  # False: bidirectional encoder (BERT)
    type_vocab_size: int = 0  # token-type (segment) embeddings (BERT: 2)
    embed_norm: bool = False  # a norm right after the embeddings (BERT)
    # lm: logits from the (tied or own) read-out | mlm: BERT's dense+act+norm, tied read-out + bias | score: a
    # linear read-out of num_labels values per position, no vocabulary (a reward model reads its last token's)
    head: str = "lm"
    num_labels: int = 1  # head=score: values per position
    value_head: bool = False  # also a scalar value per position from the final hidden states (PPO's critic)
    pooler: bool = False  # BERT's tanh(dense) of the first token
    decoder_layers: int = 0  # > 0: encoder-decoder (T5, Vaswani) with num_layers encoder layers and these
    attention_scale: float = 0.0  # scores = q.k * scale (0 = 1/sqrt(head_dim); T5: 1)
    relative_buckets: int = 32  # position=relative (T5): buckets of the learned bias
    relative_max_distance: int = 128  # position=relative: distances beyond share the last bucket
    embed_scale: bool = False  # multiply token embeddings by sqrt(d_model) (Vaswani et al., Gemma)
    scale_readout: bool = False  # multiply the final states by d_model^-0.5 before the read-out (T5 v1.0)
    decoder_start_id: int = -1  # encoder-decoder: the decoder's first input (-1 = end-of-text; T5: 0)
    attention_impl: str = "reference"  # reference | xla | cudnn
    dropout: float = 0.0  # training only: on the embeddings and on each residual branch's output
    attention_dropout: float = 0.0  # training only: on the attention weights (attention_impl=reference)
    mlp_dropout: float = 0.0  # training only: on the MLP's hidden activations, before its output projection (T5)
    # lax.scan over the stacked layers (one layer compiled once) or a Python loop (XLA fuses and schedules across
    # layers: 10-15% faster steps on CPU, compile time grows with depth). None: the loop for up to 8 layers
    # without remat, else the scan.
    scan_layers: bool | None = None
    remat: str = "none"  # gradient checkpointing per layer: none | full | save_dots
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16 (training sets it from train.precision)
    param_dtype: str = "float32"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def rope(self) -> dict | None:
        """Keyword arguments of `scaled_rope_frequencies` (without head_dim), or None without RoPE."""
        if self.position != "rope":
            return None
        return dict(
            theta=self.rope_theta,
            scaling=self.rope_scaling,
            factor=self.rope_factor,
            original_max_len=self.rope_original_max_len,
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
            beta_fast=self.rope_beta_fast,
            beta_slow=self.rope_beta_slow,
            attention_factor=self.rope_attention_factor,
            short_factor=self.rope_short_factor,
            long_factor=self.rope_long_factor,
        )

    @property
    def local_rope(self) -> dict | None:
        """`rope` of the sliding-window layers: unscaled, base rope_local_theta (None: the same as `rope`)."""
        if self.position != "rope" or not self.rope_local_theta:
            return None
        return {**self.rope, "theta": self.rope_local_theta, "scaling": "none", "short_factor": (), "long_factor": ()}

    def is_local(self, layer: int) -> bool:
        """Whether layer `layer` attends within the sliding window (as a Python bool)."""
        return bool(self.sliding_window) and not (self.global_every and (layer + 1) % self.global_every == 0)

    @property
    def scans(self) -> bool:
        """Whether the layer stack runs as a lax.scan (`scan_layers`, or automatic)."""
        if self.scan_layers is not None:
            return self.scan_layers
        # The loop is faster, but XLA may schedule a looped layer's recomputation early, which undoes remat's
        # memory saving (measured: remat=full kept 654 of 700 MiB looped, 238 MiB scanned); deep stacks compile
        # once per layer in a loop.
        return self.remat != "none" or self.num_layers > 8

    @property
    def drops(self) -> bool:
        """Whether training draws dropout masks (any rate above 0)."""
        return max(self.dropout, self.attention_dropout, self.mlp_dropout) > 0

    def __post_init__(self):
        _check_choice("model.position", self.position, POSITIONS)
        if self.decoder_layers < 0:
            raise ConfigError(f"model.decoder_layers must be >= 0, got {self.decoder_layers}")
        if self.decoder_layers and (not self.causal or self.head != "lm" or self.type_vocab_size or self.pooler):
            raise ConfigError("an encoder-decoder (model.decoder_layers > 0) keeps causal=true, head=lm, no pooler")
        _check_choice("model.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.rope_scaling != "none":
            if self.position != "rope":
                raise ConfigError(f"model.rope_scaling={self.rope_scaling} needs model.position=rope")
            if self.rope_factor <= 0:
                raise ConfigError(f"model.rope_factor must be positive, got {self.rope_factor}")
            if self.rope_scaling != "linear" and self.rope_original_max_len <= 0:
                raise ConfigError(f"model.rope_scaling={self.rope_scaling} needs model.rope_original_max_len > 0")
        _check_choice("model.norm", self.norm, NORMS)
        _check_choice("model.norm_position", self.norm_position, NORM_POSITIONS)
        _check_choice("model.mlp", self.mlp, MLPS)
        _check_choice("model.activation", self.activation, ACTIVATIONS)
        _check_choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
        for key in ("dropout", "attention_dropout", "mlp_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.attention_dropout and self.attention_impl != "reference":
            raise ConfigError(
                f"model.attention_dropout needs model.attention_impl=reference, not {self.attention_impl} "
                "(jax.nn.dot_product_attention has no dropout)"
            )
        _check_choice("model.remat", self.remat, REMAT)
        _check_choice("model.head", self.head, HEADS)
        if self.head == "mlm" and not self.tie_embeddings:
            raise ConfigError("model.head=mlm reads out through the token embedding: set model.tie_embeddings=true")
        if self.head == "score" and (not self.causal or self.decoder_layers or self.pooler):
            raise ConfigError("model.head=score scores a causal decoder's last token: needs causal=true, no decoder")
        if self.num_labels <= 0:
            raise ConfigError(f"model.num_labels must be positive, got {self.num_labels}")
        if self.type_vocab_size < 0:
            raise ConfigError(f"model.type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if self.rope_scaling == "longrope":
            half = self.dim_per_head // 2
            for key in ("rope_short_factor", "rope_long_factor"):
                if len(getattr(self, key)) != half:
                    raise ConfigError(
                        f"model.{key} needs {half} values (head_dim / 2) for longrope, got {len(getattr(self, key))}"
                    )
        elif self.rope_short_factor or self.rope_long_factor:
            raise ConfigError("model.rope_short_factor / rope_long_factor need model.rope_scaling=longrope")
        if self.rope_local_theta and not (self.position == "rope" and self.sliding_window):
            raise ConfigError(
                "model.rope_local_theta is the base of sliding-window layers: needs position=rope and sliding_window > 0"
            )
        if self.global_every and not self.sliding_window:
            raise ConfigError(
                "model.global_every alternates sliding-window and global layers: set model.sliding_window > 0"
            )
        for key in ("global_every", "attn_logit_softcap", "final_logit_softcap", "rope_local_theta"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {getattr(self, key)}")
        if self.post_norms and self.norm_position != "pre":
            raise ConfigError("model.post_norms adds norms after pre-norm branches: needs model.norm_position=pre")
        if self.norm_offset and self.norm != "rmsnorm":
            raise ConfigError(f"model.norm_offset applies to rmsnorm, not {self.norm}")
        if self.attn_logit_softcap and self.attention_impl != "reference":
            raise ConfigError(
                f"model.attn_logit_softcap needs model.attention_impl=reference, not {self.attention_impl} "
                "(jax.nn.dot_product_attention has no soft-capping)"
            )
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_choice("model.param_dtype", self.param_dtype, ("float32", "bfloat16"))
        for key in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
        for key in ("num_kv_heads", "head_dim", "sliding_window", "rope_original_max_len"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {getattr(self, key)}")
        if self.num_heads % self.kv_heads:
            raise ConfigError(
                f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads ({self.kv_heads})"
            )
        if not self.head_dim and self.d_model % self.num_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.num_heads "
                f"({self.num_heads}), or set model.head_dim"
            )
        if self.position == "rope" and self.dim_per_head % 2:
            raise ConfigError(f"model.position=rope needs an even head dim, got {self.dim_per_head}")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"model.position=sinusoidal needs an even model.d_model, got {self.d_model}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from, how it is tokenized and packed."""

    # Text (objectives clm, mlm, span): "shakespeare" (embedded corpus) | a text file, directory or glob.
    # Instructions (sft, prefix_lm): "shakespeare_instructions" (embedded set) | a JSONL file of {"messages": [...]}
    # or {"prompt", "completion"} lines (validation: `val_source`, else its last val_fraction).
    source: str = "shakespeare"
    val_source: str = ""  # instructions: a JSONL file of held-out examples
    tokenizer: str = "bpe"  # bpe (trained on the training split) | byte
    seq_len: int = 256  # tokens per training sequence
    val_fraction: float = 0.05  # share of a user corpus held out (whole files when possible)
    seed: int = 0  # shuffling seed
    document_mask: bool = False  # clm: attention stays inside each packed document, positions restart per document
    # Instructions: the tokenizer's own Jinja chat_template when it has one, else jaxlm's built-in ChatML (auto);
    # chatml: always the built-in; or a path to a Jinja template file.
    chat_template: str = "auto"
    pack: bool = True  # instructions: several examples per row (segment ids keep them apart)
    too_long: str = "truncate"  # an example over seq_len + 1 tokens: truncate (keep its start) | drop

    def __post_init__(self):
        _check_choice("data.tokenizer", self.tokenizer, ("bpe", "byte"))
        _check_choice("data.too_long", self.too_long, ("truncate", "drop"))
        if self.seq_len <= 0:
            raise ConfigError(f"data.seq_len must be positive, got {self.seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation and checkpointing."""

    steps: int = 1000  # optimizer updates
    batch_size: int = 16  # sequences per update (split into grad_accum micro-batches)
    grad_accum: int = 1  # micro-batches per update
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip (0 = off)
    z_loss: float = 0.0
    # fp32 | bf16 (bfloat16 compute, float32 master weights and optimizer state) | fp16 (float16 compute,
    # float32 master weights, dynamic loss scaling). Sets model.dtype for the run.
    precision: str = "fp32"
    loss_scale: float = 32768.0  # fp16: initial loss scale (2^15); halved when a gradient is not finite
    loss_scale_window: int = 1000  # fp16: the scale doubles after this many finite steps in a row
    # clm: next token | mlm: BERT masked tokens | span: T5 span corruption | seq2seq: pairs | sft: instruction data,
    # loss on the responses | prefix_lm: sft with the prompt attended bidirectionally (UniLM/GLM's prefix LM)
    # | reward: a reward model (model.head=score) on preference pairs | dpo: a policy on preference pairs
    # | ppo, grpo: a policy on its own samples of prompts, scored by align.reward (steps: rollout batches)
    objective: str = "clm"
    mask_rate: float = 0.15  # mlm: share of tokens predicted (80% [MASK], 10% random, 10% kept); span: noise
    mean_span: float = 3.0  # span: mean corrupted span length
    target_len: int = 0  # span/seq2seq: decoder length (0 = data.seq_len)
    seed: int = 0  # parameter init and sampling PRNG
    eval_every: int = 250  # steps between validation runs (0 = only at the end)
    eval_batches: int = 16  # validation batches per periodic run (0 = whole split)
    ckpt_every: int = 500  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    log_every: int = 10  # steps between metric lines in metrics.jsonl
    run_dir: str = "runs/default"  # where config, tokenizer, metrics and checkpoints go

    def __post_init__(self):
        for key in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_every", "eval_batches", "ckpt_every", "grad_clip", "z_loss", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum ({self.grad_accum})"
            )
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        _check_choice("train.objective", self.objective, OBJECTIVES)
        _check_choice("train.precision", self.precision, tuple(PRECISION_DTYPES))
        if not self.loss_scale >= 1.0:
            raise ConfigError(f"train.loss_scale must be >= 1, got {self.loss_scale}")
        if self.loss_scale_window <= 0:
            raise ConfigError(f"train.loss_scale_window must be positive, got {self.loss_scale_window}")
        if not 0.0 < self.mask_rate < 1.0:
            raise ConfigError(f"train.mask_rate must be in (0, 1), got {self.mask_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # train.precision -> model.dtype
OBJECTIVES = ("clm", "mlm", "span", "seq2seq", "sft", "prefix_lm", "reward", "dpo", "ppo", "grpo")
INSTRUCTION_OBJECTIVES = ("sft", "prefix_lm")
PREFERENCE_OBJECTIVES = ("reward", "dpo")  # trained on preference pairs (jaxlm.data.preferences)
RL_OBJECTIVES = ("ppo", "grpo")  # trained on the policy's own samples, scored by a reward
ALIGNMENT_OBJECTIVES = PREFERENCE_OBJECTIVES + RL_OBJECTIVES
DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge")
KL_ESTIMATORS = ("auto", "k1", "k2", "k3")
PEFT_METHODS = ("none", "lora", "qlora", "prompt", "prefix")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Where fine-tuning starts."""

    # A jaxlm run directory (its latest checkpoint) or a Hugging Face model directory: weights, tokenizer and model
    # shape come from it (model.* keys may only change dropout, remat, scan_layers, attention_impl). "" = from scratch.
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Parameter-efficient fine-tuning: only the method's parameters train, the base model stays frozen bit for bit."""

    method: str = "none"  # none (every parameter trains) | lora | qlora (NF4 base + LoRA) | prompt | prefix
    rank: int = 8  # lora/qlora: R
    alpha: float = 16.0  # lora/qlora: the update is scaled by alpha / R (rslora: alpha / sqrt(R))
    dropout: float = 0.0  # lora/qlora: dropout on the adapter's input
    rslora: bool = False
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")  # lora/qlora: projections by role
    virtual_tokens: int = 20  # prompt/prefix: P
    prompt_init_text: str = ""  # prompt: start from this text's token embeddings (peft's prompt_tuning_init=TEXT)
    prefix_hidden: int = 0  # prefix: > 0 reparameterizes through an MLP of this width while training (Li & Liang)

    def __post_init__(self):
        _check_choice("peft.method", self.method, PEFT_METHODS)
        for key in ("rank", "virtual_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"peft.{key} must be positive, got {getattr(self, key)}")
        if self.alpha <= 0:
            raise ConfigError(f"peft.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if self.prefix_hidden < 0:
            raise ConfigError(f"peft.prefix_hidden must be >= 0, got {self.prefix_hidden}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ConfigError(f"peft.targets: unknown LoRA target(s) {unknown}; choose from {list(LORA_TARGETS)}")
        if self.method in ("lora", "qlora") and not self.targets:
            raise ConfigError("peft.targets is empty: name the projections LoRA adapts, e.g. [q, v]")


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """Learning from preferences and rewards (train.objective reward, dpo)."""

    beta: float = 0.1  # dpo: β, the pull towards the reference (IPO: τ)
    dpo_loss: str = "sigmoid"  # sigmoid (DPO; conservative with label_smoothing) | robust | ipo | hinge
    label_smoothing: float = 0.0  # dpo: ε, the assumed rate of flipped labels, in [0, 0.5)
    reward_margin: float = 0.0  # reward: the Bradley-Terry loss asks r_chosen - r_rejected > this margin
    # ppo/grpo: a reward-model run directory (model.head=score, the policy's tokenizer) or a Python function
    # `module:function` called as f(prompts, completions, **fields) -> one float per completion (TRL's signature;
    # fields: the prompts' other data fields, e.g. completion and task). Built in: jaxlm.rewards.
    reward: str = ""
    response_len: int = 16  # ppo/grpo: tokens sampled per response, at most (it stops at end-of-text)
    temperature: float = 1.0  # ppo/grpo: sampling temperature; log-probs are those of the tempered policy
    top_k: int = 0  # ppo/grpo sampling (0 = off)
    top_p: float = 1.0  # ppo/grpo sampling (1 = off)
    group: int = 4  # grpo: samples per prompt, whose rewards are compared (ppo: 1)
    kl_coef: float = 0.05  # ppo: per-token KL penalty in the reward | grpo: beta of the KL term of the loss
    kl_estimator: str = "auto"  # k1 | k2 | k3 | auto (ppo k1 in the reward, grpo k3 in the loss)
    clip: float = 0.2  # ppo/grpo: the policy ratio is clipped to [1 - clip, 1 + clip]
    value_clip: float = 0.2  # ppo: values move at most this far from the rollout's
    vf_coef: float = 0.1  # ppo: weight of the value loss
    gamma: float = 1.0  # ppo: discount
    lam: float = 0.95  # ppo: GAE lambda
    epochs: int = 4  # ppo/grpo: passes over each rollout batch
    minibatches: int = 1  # ppo/grpo: optimizer updates per pass
    whiten_advantages: bool = True  # ppo
    whiten_rewards: bool = False  # ppo: scale the per-token rewards to unit variance (not centred)

    def __post_init__(self):
        _check_choice("align.dpo_loss", self.dpo_loss, DPO_LOSSES)
        _check_choice("align.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.beta <= 0:
            raise ConfigError(f"align.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"align.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        for key in ("response_len", "group", "epochs", "minibatches"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"align.{key} must be positive, got {getattr(self, key)}")
        for key in ("kl_coef", "value_clip", "vf_coef", "top_k"):
            if getattr(self, key) < 0:
                raise ConfigError(f"align.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 < self.clip < 1.0:
            raise ConfigError(f"align.clip must be in (0, 1), got {self.clip}")
        if not 0.0 < self.temperature or self.temperature == float("inf"):
            raise ConfigError(f"align.temperature must be positive (rollouts sample), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"align.top_p must be in (0, 1], got {self.top_p}")
        for key in ("gamma", "lam"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"align.{key} must be in [0, 1], got {getattr(self, key)}")

    def estimator(self, objective: str) -> str:
        """The KL estimator in use: k1 in PPO's reward, k3 in GRPO's loss, unless set."""
        if self.kl_estimator != "auto":
            return self.kl_estimator
        return "k3" if objective == "grpo" else "k1"


MESH_AXES = ("pipeline", "data", "fsdp", "tensor")  # mesh order: outermost to innermost


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and how the model is split over it (see jaxlm/parallel/).

    Axis sizes multiply to the device count (or fewer, on one process: the
    first devices are used); one of them may be -1 (the rest).
    """

    data: int = -1  # replicas; the batch is split over data x fsdp
    fsdp: int = 1  # ZeRO/FSDP: the batch is split and parameter state sharded per zero_stage
    tensor: int = 1  # Megatron tensor parallelism: heads, MLP width and vocabulary split
    pipeline: int = 1  # pipeline stages: layers split into contiguous groups
    zero_stage: int = 3  # over fsdp: 1 shards optimizer state, 2 also gradients, 3 also parameters
    microbatches: int = 0  # pipeline micro-batches per (grad_accum) micro-batch (0 = pipeline)
    pipeline_repeats: int = 1  # 1: GPipe; R > 1: circular, each stage holds R layer groups (bubble / R)

    def __post_init__(self):
        sizes = {k: getattr(self, k) for k in MESH_AXES}
        for k, v in sizes.items():
            if v == 0 or v < -1:
                raise ConfigError(f"mesh.{k} must be a positive size or -1 (the remaining devices), got {v}")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ConfigError(f"at most one mesh axis may be -1, got {sizes}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"mesh.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.microbatches < 0:
            raise ConfigError(f"mesh.microbatches must be >= 0, got {self.microbatches}")
        if self.pipeline_repeats < 1:
            raise ConfigError(f"mesh.pipeline_repeats must be >= 1, got {self.pipeline_repeats}")

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with -1 filled in; ConfigError when they do not fit `num_devices`."""
        sizes = {k: getattr(self, k) for k in MESH_AXES}
        known = 1
        for v in sizes.values():
            known *= v if v > 0 else 1
        free = [k for k, v in sizes.items() if v == -1]
        if free:
            if num_devices % known:
                raise ConfigError(
                    f"mesh {sizes} does not fit {num_devices} devices: the fixed axes multiply to {known}, "
                    f"which does not divide {num_devices}"
                )
            sizes[free[0]] = num_devices // known
        elif known > num_devices:
            raise ConfigError(
                f"mesh {sizes} needs {known} devices but {num_devices} are available; "
                "set the sizes to multiply to at most the device count, or one of them to -1"
            )
        return sizes


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    align: AlignConfig = dataclasses.field(default_factory=AlignConfig)
    # The "section.key"s the YAML and overrides set (empty when built in code): an explicit value always wins
    # or is refused with its name; what is left out is derived (dtype from train.precision, a fine-tune's
    # model from its base). Not a config key, not saved.
    given: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self):
        # train.precision is the one training knob for the compute dtype; model.dtype records it.
        want = PRECISION_DTYPES[self.train.precision]
        if self.model.dtype != want:
            if self.model.dtype != "float32" or "model.dtype" in self.given:
                raise ConfigError(
                    f"model.dtype={self.model.dtype} conflicts with train.precision={self.train.precision}; "
                    f"set the training precision with train.precision (fp32 | bf16 | fp16) alone"
                )
            object.__setattr__(self, "model", dataclasses.replace(self.model, dtype=want))
        fits = {"clm": "decoder", "mlm": "encoder", "span": "encoder-decoder", "seq2seq": "encoder-decoder"}
        fits.update(sft="decoder", prefix_lm="decoder", **dict.fromkeys(ALIGNMENT_OBJECTIVES, "decoder"))
        kind = "encoder-decoder" if self.model.decoder_layers else "decoder" if self.model.causal else "encoder"
        if fits[self.train.objective] != kind:
            raise ConfigError(
                f"train.objective={self.train.objective} trains an {fits[self.train.objective]}, but the model is an "
                f"{kind}: clm for causal decoders, mlm for encoders (model.causal=false), span or seq2seq for "
                "encoder-decoders (model.decoder_layers > 0)"
            )
        objective = self.train.objective
        if objective in ALIGNMENT_OBJECTIVES and self.train.z_loss:
            raise ConfigError(
                f"train.z_loss regularizes the softmax of next-token cross-entropy (clm, sft, prefix_lm, mlm, "
                f"span, seq2seq); train.objective={objective} has no such loss, so the setting would do nothing"
            )
        if (objective == "reward") != (self.model.head == "score"):
            raise ConfigError(
                "train.objective=reward trains a reward model (model.head=score), and a model.head=score model "
                f"trains with train.objective=reward; got objective={objective}, head={self.model.head}"
            )
        if objective == "reward" and self.model.num_labels != 1:
            raise ConfigError(f"a reward model scores with one value: model.num_labels=1, got {self.model.num_labels}")
        if objective == "ppo" and not self.model.value_head:  # PPO's critic
            if "model.value_head" in self.given:
                raise ConfigError(
                    "train.objective=ppo trains a critic (model.value_head=true); got model.value_head=false"
                )
            object.__setattr__(self, "model", dataclasses.replace(self.model, value_head=True))
        if self.model.value_head and (self.model.head != "lm" or kind != "decoder"):
            raise ConfigError("model.value_head adds a critic to a causal language model (head=lm, a decoder)")
        if objective in RL_OBJECTIVES:
            if not self.align.reward:
                raise ConfigError(
                    f"train.objective={objective} needs align.reward: a reward-model run directory or a Python "
                    "function module:function (e.g. jaxlm.rewards:passage_name)"
                )
            if objective == "ppo" and self.align.group != 1:
                raise ConfigError("align.group > 1 samples several responses per prompt for grpo; ppo takes 1")
            if objective == "grpo" and self.align.group < 2:
                raise ConfigError("grpo compares the samples of a prompt: align.group must be >= 2")
            rows = self.train.batch_size * self.align.group
            if rows % self.align.minibatches or (rows // self.align.minibatches) % self.train.grad_accum:
                raise ConfigError(
                    f"a rollout batch of train.batch_size x align.group = {rows} responses must split into "
                    f"align.minibatches ({self.align.minibatches}) of a multiple of train.grad_accum "
                    f"({self.train.grad_accum}) rows"
                )
            if self.align.response_len >= self.data.seq_len:
                raise ConfigError(
                    f"align.response_len ({self.align.response_len}) must leave room for the prompt in "
                    f"data.seq_len ({self.data.seq_len})"
                )
        if objective in ALIGNMENT_OBJECTIVES:
            if not self.finetune.init_from:
                raise ConfigError(
                    f"train.objective={objective} starts from a trained model: set finetune.init_from to a jaxlm "
                    "run directory, a Hugging Face model directory or a GGUF file"
                )
            if self.peft.method in ("prompt", "prefix"):
                raise ConfigError(
                    f"train.objective={objective} takes peft.method none, lora or qlora (the reference is the "
                    f"model with its adapters off), not {self.peft.method}"
                )
        if self.peft.method in ("prompt", "prefix") and kind != "decoder":
            raise ConfigError(f"peft.method={self.peft.method} adapts decoders; this model is an {kind}")
        if self.peft.method == "prompt" and self.model.position == "learned":
            if self.data.seq_len + self.peft.virtual_tokens > self.model.max_seq_len:
                raise ConfigError(
                    f"data.seq_len ({self.data.seq_len}) + peft.virtual_tokens ({self.peft.virtual_tokens}) exceed "
                    f"the learned position table (model.max_seq_len {self.model.max_seq_len})"
                )
        packed = self.data.document_mask or (self.train.objective in INSTRUCTION_OBJECTIVES and self.data.pack)
        if self.peft.method in ("prompt", "prefix") and packed:
            raise ConfigError(
                f"peft.method={self.peft.method} puts its virtual tokens before each row, so a row holds one example: "
                "set data.pack=false (and data.document_mask=false)"
            )
        if self.peft.method != "none" and self.mesh.pipeline != 1:
            raise ConfigError("peft methods run without pipeline parallelism; use mesh.pipeline=1")
        if self.data.document_mask and self.train.objective != "clm":
            raise ConfigError("data.document_mask applies to packed text (train.objective=clm)")
        if self.model.decoder_layers and self.mesh.pipeline != 1:
            raise ConfigError("pipeline parallelism supports single-stack models; use mesh.pipeline=1")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def from_dict(cls, data: Any, prefix: str = ""):
    """Builds dataclass `cls` from a nested dict, checking keys and types."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not (cls is Config and f.name == "given")}
    hints = typing.get_type_hints(cls)
    data = dict(data)
    base = None
    if cls is ModelConfig and "preset" in data:
        base = get_preset(data.pop("preset"))
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        raise ConfigError(f"unknown config key(s): {names}; valid keys under {where}: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value, key)
        else:
            values[name] = _coerce(key, value, hint)
    if cls is Config:  # what the config sets itself (a preset: the fields it names)
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        keys = [f"{s}.{k}" for s, sub in data.items() if isinstance(sub, dict) for k in sub if k != "preset"]
        keys += [f"model.{k}" for k in PRESET_FIELDS.get(model.get("preset"), ())]  # what the preset names
        values["given"] = frozenset(keys)
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except TypeError as e:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"{where}: {e}") from None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
        raise ConfigError(f"{key} must be a list of {item.__name__}, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")


def parse_overrides(overrides: list[str]) -> dict:
    """["model.num_layers=4", ...] -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Reads a YAML config (or defaults when path is None) and applies overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping with model/data/train sections")
    data = _merge(data, parse_overrides(list(overrides)))
    return from_dict(Config, data)


def to_dict(config) -> dict:
    """Nested plain dict (tuples as lists, as YAML writes them); `Config.given` is not part of it."""
    out = dataclasses.asdict(
        config, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v for k, v in items}
    )
    if isinstance(config, Config):
        del out["given"]
    return out


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


# After every check ModelConfig runs is defined.
PRESETS: dict[str, ModelConfig] = {name: ModelConfig(**fields) for name, fields in PRESET_FIELDS.items()}


def get_preset(name: str) -> ModelConfig:
    """A published architecture (`jaxlm.presets`), as `model: {preset: NAME}` in YAML reads it."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"model.preset {name!r} is unknown; available: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
