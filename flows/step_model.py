"""The model of one training step: backbone, quality branch and margin head arranged as its `StepKind` says."""

from __future__ import annotations

import torch
from torch import nn

from flows import checkpoints
from flows.config import Config
from flows.steps import StepKind, StepSpec
from models.eqface_net import EQFaceNet


def build_net_and_head(cfg: Config, num_classes: int) -> tuple[EQFaceNet, nn.Module]:
    """The EQFaceNet and the margin head (full or sharded) of the config."""
    return cfg.model.build_net(cfg.data.image_size), cfg.model.build_head(num_classes, cfg.loss)


class StepModel(nn.Module):
    """Backbone, quality branch and margin head arranged for one kind of step.

    Only the parts the step trains have requires_grad; frozen parts stay in eval mode whatever
    `.train()` is called with, so their BatchNorm statistics never move.
    forward(images, labels) -> (loss, cos θ (B, C), s_i (B,) or None where s_i = 1).
    """

    def __init__(self, kind: int, net: EQFaceNet, head: nn.Module, teacher: EQFaceNet | None = None,
                 train_centres: bool = False) -> None:
        super().__init__()
        kind = StepKind(kind)
        if kind.needs_teacher and teacher is None:
            raise ValueError(f"step {kind} needs a quality teacher (a step-2 checkpoint)")
        self.kind, self.net, self.head, self.teacher = kind, net, head, teacher
        # step2.train_centres: the authors' code also trains the centres in step 2 (steps 1 and 3 always do).
        self.trains = kind.learns | ({"centres"} if train_centres else set())
        net.backbone.requires_grad_("backbone" in self.trains)
        net.quality.requires_grad_("quality" in self.trains)
        head.requires_grad_("centres" in self.trains)
        if teacher is not None:
            teacher.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> StepModel:
        super().train(mode)
        self.net.backbone.train(mode and "backbone" in self.trains)
        self.net.quality.train(mode and "quality" in self.trains)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @property
    def quality_net(self) -> EQFaceNet | None:
        """The network whose quality branch gives this step's s_i (and its validation's quality)."""
        return self.kind.quality_from(own=self.net, teacher=self.teacher)

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        learns_embedding = "backbone" in self.trains
        if self.net.channels_last:  # NHWC batches for the NHWC conv weights (EQFaceNet's default), as its forward
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(learns_embedding and torch.is_grad_enabled()):
            embedding, feature_map = self.net.backbone(images)
        quality = None
        if self.kind.quality == "own":
            quality = self.net.quality(feature_map.float())
        elif self.kind.quality == "teacher":
            with torch.no_grad():
                _, teacher_map = self.teacher.backbone(images)
                quality = self.teacher.quality(teacher_map.float())
        out = self.head(embedding, labels, quality)
        return out.loss, out.cos, quality


def build_step_model(cfg: Config, spec: StepSpec) -> StepModel:
    """The step's model, initialised from its inputs as its kind says."""
    kind = spec.kind
    torch.manual_seed(cfg.flow.seed + 1000 * spec.step.index)
    net, head = build_net_and_head(cfg, spec.num_classes)
    if kind.continues(cfg):
        if spec.init_checkpoint is None:
            raise ValueError(f"{spec.name}: needs the previous step's checkpoint to start from")
        state = checkpoints.load_state_and_centres(spec.init_checkpoint, head)
        net.backbone.load_state_dict(state["backbone"])
    teacher = None
    if kind.needs_teacher:
        if spec.teacher_checkpoint is None:
            raise ValueError(f"{spec.name}: step 3 needs a step-2 checkpoint as its quality teacher")
        teacher = checkpoints.load_net(spec.teacher_checkpoint)
        # Carried along so the step-3 checkpoint is a complete network; the next step 2 retrains it.
        net.quality.load_state_dict(teacher.quality.state_dict())
    return StepModel(kind, net, head, teacher, train_centres=cfg.step2.train_centres)
