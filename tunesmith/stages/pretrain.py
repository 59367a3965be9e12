"""Continued pre-training on raw domain text: every token of a document is a target. The loss is SFT's
(token cross-entropy over the step's label tokens); what differs is the data it accepts."""

from __future__ import annotations

from tunesmith.stages.sft import SftStage


class PretrainStage(SftStage):
    name = "pretrain"
    init_values = {"data.format": "text"}
