"""Training: optimizer, pure train/eval steps, checkpoints and the loop."""

from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.evaluation import evaluate
from jaxlm.train.optimizer import lr_schedule, make_optimizer
from jaxlm.train.run_dir import RunDir, load_run
from jaxlm.train.step import TrainState, init_train_state, make_eval_step, make_train_step
from jaxlm.train.trainer import read_metrics, train

__all__ = [
    "Checkpointer",
    "RunDir",
    "TrainState",
    "evaluate",
    "init_train_state",
    "load_run",
    "lr_schedule",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "read_metrics",
    "train",
]
