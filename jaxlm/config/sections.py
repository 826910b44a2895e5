"""The run sections of a config: data, train, finetune, peft, align and mesh. Each checks its own fields;
checks that span sections are `jaxlm.config.checks`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxlm.errors import ConfigError, check_choice

PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # train.precision -> model.dtype
OBJECTIVES = ("clm", "mlm", "span", "seq2seq", "sft", "prefix_lm", "reward", "dpo", "ppo", "grpo")
INSTRUCTION_OBJECTIVES = ("sft", "prefix_lm")
PREFERENCE_OBJECTIVES = ("reward", "dpo")  # trained on preference pairs (jaxlm.data.preferences)
RL_OBJECTIVES = ("ppo", "grpo")  # trained on the policy's own samples, scored by a reward
TEXT_OBJECTIVES = ("clm", "mlm", "span")  # trained on a text corpus, prepared once (jaxlm.data.prepare)
ALIGNMENT_OBJECTIVES = PREFERENCE_OBJECTIVES + RL_OBJECTIVES
DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge")
KL_ESTIMATORS = ("auto", "k1", "k2", "k3")
PEFT_METHODS = ("none", "lora", "qlora", "prompt", "prefix")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head")


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One corpus of a `data.mixture`: its windows make up `weight` of the training windows (weights are
    normalised)."""

    source: str
    weight: float = 1.0
    name: str = ""  # in metrics (data/NAME_tokens, data/NAME_epochs); "" = the source's file or directory name
    text_field: str = ""  # "" = data.text_field

    def __post_init__(self):
        if not self.weight > 0:
            raise ConfigError(f"data.mixture: {self.source!r} has weight {self.weight}; weights must be positive")

    @property
    def label(self) -> str:
        stem = Path(self.source.rstrip("/*")).name.split(".")[0]
        return self.name or stem or self.source


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from, how it is tokenized and packed."""

    # Text (objectives clm, mlm, span): "shakespeare" (embedded corpus) | files, a directory or a glob of text,
    # JSONL (.gz/.zst), Parquet or Arrow (`datasets` save_to_disk) | a directory `jaxlm data prepare` wrote.
    # A raw source is tokenized once into data.cache_dir and memory-mapped by every later run.
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
    text_field: str = "text"  # JSONL / Parquet / Arrow: the field or column holding a document's text
    max_bad_records: int = 100  # malformed JSONL lines skipped (with file:line warnings) before it is an error
    tokenizer_sample_mb: float = 256.0  # bpe: trained on at most this many MB of the training split (deterministic)
    cache_dir: str = ""  # where raw sources are prepared ("" = $JAXLM_CACHE/data or ~/.cache/jaxlm/data)
    # Text: several corpora interleaved by weight instead of data.source: [{source: ..., weight: ...}, ...]. Each is
    # prepared apart (one tokenizer, trained on a weighted sample of all); validation is all their held-out text.
    mixture: tuple[MixtureSource, ...] = ()

    def __post_init__(self):
        check_choice("data.tokenizer", self.tokenizer, ("bpe", "byte"))
        check_choice("data.too_long", self.too_long, ("truncate", "drop"))
        if self.seq_len <= 0:
            raise ConfigError(f"data.seq_len must be positive, got {self.seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_bad_records < 0:
            raise ConfigError(f"data.max_bad_records must be >= 0, got {self.max_bad_records}")
        if self.tokenizer_sample_mb <= 0:
            raise ConfigError(f"data.tokenizer_sample_mb must be positive, got {self.tokenizer_sample_mb}")
        if not self.text_field:
            raise ConfigError("data.text_field must name a field")
        labels = [m.label for m in self.mixture]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"data.mixture: names {labels} repeat; give each source a distinct name")


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
        check_choice("train.objective", self.objective, OBJECTIVES)
        check_choice("train.precision", self.precision, tuple(PRECISION_DTYPES))
        if not self.loss_scale >= 1.0:
            raise ConfigError(f"train.loss_scale must be >= 1, got {self.loss_scale}")
        if self.loss_scale_window <= 0:
            raise ConfigError(f"train.loss_scale_window must be positive, got {self.loss_scale_window}")
        if not 0.0 < self.mask_rate < 1.0:
            raise ConfigError(f"train.mask_rate must be in (0, 1), got {self.mask_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


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
        check_choice("peft.method", self.method, PEFT_METHODS)
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
        check_choice("align.dpo_loss", self.dpo_loss, DPO_LOSSES)
        check_choice("align.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
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


MESH_AXES = ("pipeline", "data", "fsdp", "context", "expert", "tensor")  # mesh order: outermost to innermost


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and how the model is split over it (see jaxlm/parallel/).

    Axis sizes multiply to the device count (or fewer, on one process: the
    first devices are used); one of them may be -1 (the rest).
    """

    data: int = -1  # replicas; the batch is split over data x fsdp x expert
    fsdp: int = 1  # ZeRO/FSDP: the batch is split and parameter state sharded per zero_stage
    context: int = 1  # context parallelism: the sequence split, attention as ring attention (zig-zag layout)
    expert: int = 1  # expert parallelism: a mixture's experts split, tokens sent to them all-to-all (and the batch)
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
