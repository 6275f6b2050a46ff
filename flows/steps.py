"""The paper's training figure: three kinds of step, and the plan that chains them.

    step 1  backbone + margin head learn, s_i = 1                    (paper eq. 3)
    step 2  backbone frozen; only the quality branch learns          (eq. 6, s_i from the branch)
    step 3  a frozen step-2 network is the quality teacher; a backbone + margin head learn with
            its s_i as per-sample weights                            (eq. 6, s_i from the teacher)

Plan: 1 -> (2 -> 3) x flow.loops -> 2, so the final quality branch matches the final backbone.
Every place that treats the kinds differently reads `StepKind`; none switches on the number.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.config import Config, StepConfig

# The parts of a step's model: the backbone, the quality branch, the margin head's class centres.
PARTS = ("backbone", "quality", "centres")


class StepKind(IntEnum):
    """One record per kind of step; a member compares equal to its number (1, 2, 3) and prints as it.

    section   the config section of its optimisation settings
    learns    the parts that get gradients (the others are frozen: no grad, eval mode)
    quality   where s_i in the loss comes from: "none" (s_i = 1), "own" (the branch that learns),
              "teacher" (the latest step 2's network, frozen); validation reads quality from the same net
    init      the weights it starts from: "scratch", "continue" (the previous step's backbone and centres),
              or None: the section's own `init` option (step3.init)
    reads     the part of the training set it learns from (data/splits.py): "fit" for the backbone steps,
              "holdout" for the quality steps; both are the whole set unless data.quality_holdout > 0
    """

    section: str
    learns: frozenset[str]
    quality: str
    init: str | None
    reads: str

    def __new__(cls, number: int, section: str, learns: tuple[str, ...], quality: str, init: str | None,
                reads: str):
        member = int.__new__(cls, number)
        member._value_ = number
        member.section, member.learns, member.quality, member.init = section, frozenset(learns), quality, init
        member.reads = reads
        return member

    #           number  section  learns                   quality    init        reads
    BACKBONE = (1,      "step1", ("backbone", "centres"), "none",    "scratch",  "fit")
    QUALITY = (2,       "step2", ("quality",),            "own",     "continue", "holdout")
    REWEIGHTED = (3,    "step3", ("backbone", "centres"), "teacher", None,       "fit")

    def __str__(self) -> str:
        return str(int(self))

    def settings(self, cfg: Config) -> StepConfig:
        return cfg.section(self.section)

    def continues(self, cfg: Config) -> bool:
        """Starts from the previous step's backbone and centres (else from new weights)."""
        return (self.init or self.settings(cfg).init) == "continue"

    def quality_from(self, own: Any, teacher: Any) -> Any:
        """Of a step's own network (or checkpoint) and its teacher's, the one whose quality branch gives s_i."""
        return {"none": None, "own": own, "teacher": teacher}[self.quality]

    @property
    def needs_teacher(self) -> bool:
        return self.quality == "teacher"

    @property
    def learns_quality(self) -> bool:
        """Its checkpoint is the quality network the next steps use (their teacher, the final model's branch)."""
        return "quality" in self.learns

    @property
    def reports_quality(self) -> bool:
        return self.quality != "none"


@dataclass(frozen=True)
class PlannedStep:
    """A step's place in the flow: its position, its kind, the loop it belongs to."""

    index: int
    kind: StepKind
    loop: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", StepKind(self.kind))  # PlannedStep(0, 1, 0) works too

    @property
    def name(self) -> str:
        return f"step {self.index} (kind {self.kind}, loop {self.loop})"


def training_plan(loops: int) -> list[PlannedStep]:
    """The paper's training figure: 1, then (2, 3) per loop, and a final 2 so the quality head matches."""
    kinds = [(StepKind.BACKBONE, 0)]
    for loop in range(loops):
        kinds += [(StepKind.QUALITY, loop), (StepKind.REWEIGHTED, loop)]
    kinds.append((StepKind.QUALITY, loops))
    return [PlannedStep(i, kind, loop) for i, (kind, loop) in enumerate(kinds)]


@dataclass
class StepSpec:
    """What the driver tells one step's workers: its place in the flow, the data size, its inputs and its run."""

    step: PlannedStep
    num_classes: int
    mlflow_run_id: str = ""  # empty: an untracked step (margin-search trials, benchmarks)
    tracking_uri: str = ""
    init_checkpoint: Any = None  # ray.train.Checkpoint: backbone + centres to start from
    teacher_checkpoint: Any = None  # ray.train.Checkpoint of the latest step 2 (a step 3's teacher)

    @property
    def kind(self) -> StepKind:
        return self.step.kind

    @property
    def name(self) -> str:
        return self.step.name
