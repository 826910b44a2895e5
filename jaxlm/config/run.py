"""`Config`: the whole run, one frozen dataclass per section, checked across sections on construction."""

from __future__ import annotations

import dataclasses

from jaxlm.config import checks
from jaxlm.config.model import ModelConfig
from jaxlm.config.sections import (
    AlignConfig,
    DataConfig,
    FinetuneConfig,
    MeshConfig,
    PeftConfig,
    TrainConfig,
)


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
        object.__setattr__(self, "model", checks.derived_model(self))
        for check in checks.CROSS_SECTION:
            check(self)
