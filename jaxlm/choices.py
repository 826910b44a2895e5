"""The named options of a model, defined once: config validation, ops and modules all read these."""

POSITIONS = ("rope", "learned", "sinusoidal", "alibi", "relative", "none")
ROPE_SCALINGS = ("none", "linear", "dynamic", "yarn", "llama3", "longrope")
NORMS = ("rmsnorm", "layernorm")
NORM_POSITIONS = ("pre", "post")
MLPS = ("gated", "plain")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "quick_gelu")
ATTENTION_IMPLS = ("reference", "xla", "cudnn", "blockwise")
REMAT = ("none", "full", "save_dots")
HEADS = ("lm", "mlm", "score")
ROUTER_SCORES = ("softmax", "sigmoid")  # mixture of experts: how router logits become scores
EXPERT_IMPLS = ("auto", "blocks", "ragged")  # how the experts' matmuls run (jaxlm.ops.moe)
