"""`ModelConfig`: a transformer's shape and wiring as semantic fields, and the published shapes (presets)."""

from __future__ import annotations

import dataclasses

from jaxlm.choices import (
    ACTIVATIONS,
    ATTENTION_IMPLS,
    EXPERT_IMPLS,
    HEADS,
    MLPS,
    NORM_POSITIONS,
    NORMS,
    POSITIONS,
    REMAT,
    ROPE_SCALINGS,
    ROUTER_SCORES,
)
from jaxlm.errors import ConfigError, check_choice
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
    # Multi-head latent attention (DeepSeek-V2/V3) when kv_lora_rank > 0: keys and values from a per-token latent
    # of kv_lora_rank values (what the cache holds), plus a RoPE key of qk_rope_head_dim shared by the heads.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # > 0: queries through a low-rank bottleneck of this rank (with a norm)
    qk_rope_head_dim: int = 0  # the rotated part of each query and key head
    qk_nope_head_dim: int = 0  # the unrotated part (0 = head_dim)
    v_head_dim: int = 0  # value head width (0 = head_dim)
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
    rope_truncate: bool = True  # yarn: whole-dimension correction range (Hugging Face's `truncate`; gpt-oss: false)
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
    activation: str = "silu"  # silu | gelu | gelu_tanh | relu | quick_gelu (x sigmoid(1.702 x))
    mlp_clamp: float = 0.0  # gated MLPs: the gate clipped to <= c and the up projection to [-c, c] (gpt-oss: 7)
    mlp_up_shift: float = 0.0  # gated MLPs: act(gate) * (up + shift) (gpt-oss: 1)
    qkv_bias: bool = False  # bias on q/k/v projections (GPT-2, Qwen2)
    out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # biases in the feed-forward block (GPT-2)
    norm_bias: bool = True  # LayerNorm bias (ignored by rmsnorm)
    tie_embeddings: bool = False  # logits reuse the token embedding
    # Mixture of experts (Mixtral, Qwen-MoE): each token's feed-forward block is the weighted sum of
    # experts_per_token of num_experts expert MLPs (of kind `mlp`), chosen by a linear router.
    num_experts: int = 0  # E (0 = one dense MLP)
    experts_per_token: int = 2  # k
    expert_mlp_dim: int = 0  # each expert's hidden width (0 = mlp_dim)
    shared_experts: int = 0  # also a dense MLP of shared_experts * expert hidden width on every token
    shared_expert_gate: bool = False  # the shared MLP's output times sigmoid(x . w) (Qwen2-MoE)
    router: str = "softmax"  # softmax | sigmoid: the router's scores of the experts
    router_bias: bool = False  # a bias on the router's logits (gpt-oss)
    # A per-expert bias added to the scores only to choose the experts (DeepSeek-V3's e_score_correction_bias:
    # auxiliary-loss-free balancing); training moves it by router_balance_rate x sign(mean load - load) a step.
    router_balance: bool = False
    router_balance_rate: float = 0.0
    router_groups: int = 0  # group-limited routing: experts in this many groups (DeepSeek-V3's n_group) ...
    router_group_limit: int = 0  # ... and a token chooses within its best this many (topk_group)
    first_dense_layers: int = 0  # the first layers keep a dense MLP of mlp_dim (DeepSeek's first_k_dense_replace)
    router_normalize: bool = True  # a token's k weights sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob)
    router_scale: float = 1.0  # the weights times this (DeepSeek-V3's routed_scaling_factor)
    capacity_factor: float = 0.0  # > 0: an expert takes at most ceil(f * tokens * k / E) of a batch; 0 = dropless
    expert_impl: str = "auto"  # blocks | ragged | auto (ragged on GPU/TPU, blocks on CPU): see jaxlm.ops.moe
    aux_loss_weight: float = 0.0  # training: the load-balancing loss (Switch), per token, times this
    router_z_loss_weight: float = 0.0  # training: the router z-loss (ST-MoE) times this
    sliding_window: int = 0  # attend to the last N keys only (0 = full causal); bidirectional: |q - k| < N
    global_every: int = 0  # with sliding_window: layers n-1, 2n-1, ... attend globally (Gemma 2: 2, Gemma 3: 6)
    attention_sinks: bool = False  # a learned logit per head joins each softmax and takes its share (gpt-oss)
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
    attention_impl: str = "reference"  # reference | xla | cudnn | blockwise (flash-style: memory linear in T)
    attention_block: int = 512  # attention_impl=blockwise: query and key tile length (T is padded to tiles)
    # Losses read out this many positions at a time (every row), the backward pass recomputing their logits:
    # memory B·logits_chunk·V instead of B·T·V. 0: the whole sequence at once.
    logits_chunk: int = 0
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

    def without_experts(self) -> ModelConfig:
        """This config with a dense MLP (every mixture-of-experts field at its default): a dense layer's."""
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in EXPERT_FIELDS}
        return dataclasses.replace(self, num_experts=0, **defaults)

    @property
    def mla_nope_dim(self) -> int:
        return self.qk_nope_head_dim or self.dim_per_head

    @property
    def mla_v_dim(self) -> int:
        return self.v_head_dim or self.dim_per_head

    @property
    def expert_hidden(self) -> int:
        return self.expert_mlp_dim or self.mlp_dim

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
            truncate=self.rope_truncate,
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
        check_choice("model.position", self.position, POSITIONS)
        if self.decoder_layers < 0:
            raise ConfigError(f"model.decoder_layers must be >= 0, got {self.decoder_layers}")
        if self.decoder_layers and (not self.causal or self.head != "lm" or self.type_vocab_size or self.pooler):
            raise ConfigError("an encoder-decoder (model.decoder_layers > 0) keeps causal=true, head=lm, no pooler")
        check_choice("model.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.rope_scaling != "none":
            if self.position != "rope":
                raise ConfigError(f"model.rope_scaling={self.rope_scaling} needs model.position=rope")
            if self.rope_factor <= 0:
                raise ConfigError(f"model.rope_factor must be positive, got {self.rope_factor}")
            if self.rope_scaling != "linear" and self.rope_original_max_len <= 0:
                raise ConfigError(f"model.rope_scaling={self.rope_scaling} needs model.rope_original_max_len > 0")
        check_choice("model.norm", self.norm, NORMS)
        check_choice("model.norm_position", self.norm_position, NORM_POSITIONS)
        check_choice("model.mlp", self.mlp, MLPS)
        check_choice("model.activation", self.activation, ACTIVATIONS)
        check_choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
        for key in ("dropout", "attention_dropout", "mlp_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.attention_dropout and self.attention_impl != "reference":
            raise ConfigError(
                f"model.attention_dropout needs model.attention_impl=reference, not {self.attention_impl} "
                "(jax.nn.dot_product_attention has no dropout)"
            )
        check_choice("model.remat", self.remat, REMAT)
        check_choice("model.head", self.head, HEADS)
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
        if self.rope_scaling != "yarn" and not self.rope_truncate:
            raise ConfigError("model.rope_truncate=false applies to model.rope_scaling=yarn")
        if (self.mlp_clamp or self.mlp_up_shift) and self.mlp != "gated":
            raise ConfigError("model.mlp_clamp / mlp_up_shift shape a gated MLP's gate and up: needs model.mlp=gated")
        if self.mlp_clamp < 0:
            raise ConfigError(f"model.mlp_clamp must be >= 0, got {self.mlp_clamp}")
        if self.logits_chunk < 0:
            raise ConfigError(f"model.logits_chunk must be >= 0 (0: the whole sequence), got {self.logits_chunk}")
        if self.attention_block < 1:
            raise ConfigError(f"model.attention_block must be >= 1, got {self.attention_block}")
        if self.attention_sinks and self.attention_impl not in ("reference", "blockwise"):
            raise ConfigError(
                f"model.attention_sinks needs model.attention_impl=reference or blockwise, not {self.attention_impl} "
                "(jax.nn.dot_product_attention has no sinks)"
            )
        if self.attn_logit_softcap and self.attention_impl not in ("reference", "blockwise"):
            raise ConfigError(
                f"model.attn_logit_softcap needs model.attention_impl=reference or blockwise, not {self.attention_impl} "
                "(jax.nn.dot_product_attention has no soft-capping)"
            )
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("model.param_dtype", self.param_dtype, ("float32", "bfloat16"))
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
        self._check_experts()
        self._check_latent_attention()
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"model.position=sinusoidal needs an even model.d_model, got {self.d_model}")

    def _check_latent_attention(self):
        for key in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {getattr(self, key)}")
        if not self.kv_lora_rank:
            for key in ("q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                if getattr(self, key):
                    raise ConfigError(f"model.{key} shapes latent attention: set model.kv_lora_rank > 0")
            return
        if self.position != "rope" or not self.qk_rope_head_dim or self.qk_rope_head_dim % 2:
            raise ConfigError(
                "latent attention (model.kv_lora_rank > 0) rotates a decoupled key: needs model.position=rope and "
                f"an even model.qk_rope_head_dim > 0, got {self.position!r} and {self.qk_rope_head_dim}"
            )
        for key in ("kv_lora_rank", "q_lora_rank"):
            if getattr(self, key) > self.d_model:
                raise ConfigError(
                    f"model.{key} ({getattr(self, key)}) exceeds model.d_model ({self.d_model}): not a compression"
                )
        if self.qkv_bias or self.qk_norm or self.num_kv_heads not in (0, self.num_heads):
            raise ConfigError(
                "latent attention (model.kv_lora_rank > 0) has its own key/value projections: model.qkv_bias, "
                "model.qk_norm and model.num_kv_heads do not apply (leave them false / 0)"
            )
        if self.attention_impl not in ("reference", "blockwise"):
            raise ConfigError(
                "latent attention's value heads differ from its query heads: model.attention_impl=reference or "
                "blockwise"
            )

    def _check_experts(self):
        check_choice("model.router", self.router, ROUTER_SCORES)
        check_choice("model.expert_impl", self.expert_impl, EXPERT_IMPLS)
        for key in ("num_experts", "expert_mlp_dim", "shared_experts", "capacity_factor"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("aux_loss_weight", "router_z_loss_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {getattr(self, key)}")
        if not self.num_experts:
            defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
            for key in EXPERT_FIELDS:
                if getattr(self, key) != defaults[key]:
                    raise ConfigError(f"model.{key} configures a mixture of experts: set model.num_experts > 0")
            return
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(
                f"model.experts_per_token ({self.experts_per_token}) must be between 1 and model.num_experts "
                f"({self.num_experts})"
            )
        if self.router_balance_rate < 0 or (self.router_balance_rate and not self.router_balance):
            raise ConfigError(
                "model.router_balance_rate moves the balancing bias: needs model.router_balance=true, rate >= 0"
            )
        if self.router_groups < 0 or self.router_group_limit < 0:
            raise ConfigError("model.router_groups / router_group_limit must be >= 0")
        if self.router_group_limit:
            if self.router_groups < 2 or self.num_experts % self.router_groups:
                raise ConfigError(
                    f"model.router_groups ({self.router_groups}) must be >= 2 and divide model.num_experts "
                    f"({self.num_experts}) for group-limited routing"
                )
            if self.router_group_limit > self.router_groups:
                raise ConfigError(
                    f"model.router_group_limit ({self.router_group_limit}) exceeds model.router_groups "
                    f"({self.router_groups})"
                )
            if self.experts_per_token > self.router_group_limit * (self.num_experts // self.router_groups):
                raise ConfigError("model.experts_per_token exceeds the experts of model.router_group_limit groups")
        elif self.router_groups:
            raise ConfigError("model.router_groups needs model.router_group_limit > 0 (the groups a token may use)")
        if not 0 <= self.first_dense_layers < self.num_layers:
            raise ConfigError(
                f"model.first_dense_layers ({self.first_dense_layers}) must be in [0, model.num_layers "
                f"({self.num_layers})): at least one layer keeps experts"
            )
        if self.router_balance_rate and self.decoder_layers:
            raise ConfigError("model.router_balance_rate balances a single stack's experts (model.decoder_layers=0)")
        if self.decoder_layers and self.first_dense_layers >= self.decoder_layers:
            raise ConfigError(
                f"model.first_dense_layers ({self.first_dense_layers}) must leave the decoder's "
                f"{self.decoder_layers} layers one with experts"
            )
        if self.shared_expert_gate and not self.shared_experts:
            raise ConfigError("model.shared_expert_gate gates the shared experts: set model.shared_experts > 0")
        if self.router_scale <= 0:
            raise ConfigError(f"model.router_scale must be positive, got {self.router_scale}")
        if self.mlp_dropout:
            raise ConfigError("model.mlp_dropout is not applied inside experts; set it to 0 with model.num_experts")


# The fields that configure a mixture of experts (refused without num_experts).
EXPERT_FIELDS = (
    "expert_mlp_dim",
    "shared_experts",
    "shared_expert_gate",
    "router",
    "router_normalize",
    "router_balance",
    "router_balance_rate",
    "router_groups",
    "router_group_limit",
    "first_dense_layers",
    "router_bias",
    "router_scale",
    "capacity_factor",
    "expert_impl",
    "aux_loss_weight",
    "router_z_loss_weight",
)

# The published shapes, each checked as any ModelConfig is.
PRESETS: dict[str, ModelConfig] = {name: ModelConfig(**fields) for name, fields in PRESET_FIELDS.items()}


def get_preset(name: str) -> ModelConfig:
    """A published architecture (`jaxlm.presets`), as `model: {preset: NAME}` in YAML reads it."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"model.preset {name!r} is unknown; available: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
