"""Training stages, one module each behind the Stage protocol (stages/base.py); `stage.name` picks one."""

from __future__ import annotations

from tunesmith.config.schema import Config
from tunesmith.stages.base import Stage
from tunesmith.stages.grpo import GrpoStage
from tunesmith.stages.kto import KtoStage
from tunesmith.stages.ppo import PpoStage
from tunesmith.stages.preference import DpoStage, OrpoStage, SimpoStage
from tunesmith.stages.pretrain import PretrainStage
from tunesmith.stages.reward import RewardStage
from tunesmith.stages.sft import SftStage

STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in (SftStage, PretrainStage, DpoStage, OrpoStage, SimpoStage,
                                                            KtoStage, RewardStage, GrpoStage, PpoStage)}


def get_stage(cfg: Config) -> Stage:
    return STAGES[cfg.stage.name](cfg.stage, cfg)


__all__ = ["STAGES", "Stage", "get_stage"]
