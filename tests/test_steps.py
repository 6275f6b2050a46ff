"""The table of step kinds (flows/steps.py): what each kind trains, where its inputs come from, what it reads."""

from __future__ import annotations

import pickle

import pytest

from flows.config import load_config
from flows.steps import PlannedStep, StepKind, training_plan


def test_each_kind_says_what_trains_and_where_its_inputs_come_from():
    cfg = load_config()
    one, two, three = StepKind(1), StepKind(2), StepKind(3)
    assert (one.learns, two.learns, three.learns) == (
        {"backbone", "centres"}, {"quality"}, {"backbone", "centres"})
    assert (one.quality, two.quality, three.quality) == ("none", "own", "teacher")
    assert [k.needs_teacher for k in (one, two, three)] == [False, False, True]
    assert [k.learns_quality for k in (one, two, three)] == [False, True, False]
    assert [k.continues(cfg) for k in (one, two, three)] == [False, True, True]  # step3.init: continue
    assert not three.continues(load_config([], ["step3.init=scratch"]))
    assert [k.settings(cfg) for k in (one, two, three)] == [cfg.step1, cfg.step2, cfg.step3]
    assert (one.reads, two.reads, three.reads) == ("fit", "holdout", "fit")
    assert two.quality_from(own="net", teacher="t") == "net" and three.quality_from(own="net", teacher="t") == "t"
    assert one.quality_from(own="net", teacher="t") is None


def test_a_kind_is_its_number_everywhere_it_is_shown_or_stored():
    assert StepKind(2) == 2 and f"{StepKind(2)}" == "2" and str(StepKind(3)) == "3"
    assert pickle.loads(pickle.dumps(StepKind(3))) is StepKind.REWEIGHTED
    step = PlannedStep(4, 3, 1)
    assert step.kind is StepKind.REWEIGHTED and step.name == "step 4 (kind 3, loop 1)"
    with pytest.raises(ValueError):
        PlannedStep(0, 4, 0)


def test_the_plan_ends_with_a_quality_step_and_every_reweighted_step_has_a_teacher_before_it():
    for loops in range(4):
        plan = training_plan(loops)
        assert plan[0].kind is StepKind.BACKBONE and plan[-1].kind.learns_quality
        for i, step in enumerate(plan):
            if step.kind.needs_teacher:
                assert any(earlier.kind.learns_quality for earlier in plan[:i])
