"""Config loading: YAML overlays, CLI overrides, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.config import Config, ConfigError, config_from_dict, flatten, load_config
from flows.eqface import training_plan
from models import Margin

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.yaml"


def test_default_yaml_spells_out_the_dataclass_defaults():
    assert load_config([DEFAULT]) == Config()
    assert set(yaml.safe_load(DEFAULT.read_text())) == set(Config().to_dict())
    # Every key, at every depth, with the dataclass default's value: the YAML cannot drift from the code.
    written = flatten(yaml.safe_load(DEFAULT.read_text()))
    assert written == Config().flat()


def test_overlays_and_overrides_apply_in_order(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("loss: {m2: 0.3}\nstep1: {epochs: 7}\n")
    overrides = ["loss.m2=0.4", "scaling.num_workers=1", "data.augment.jpeg_quality=[50, 60]", "step2.lr=1e-6"]
    cfg = load_config([DEFAULT, overlay], overrides)
    assert cfg.loss.m2 == 0.4
    assert cfg.step1.epochs == 7
    assert cfg.scaling.num_workers == 1
    assert cfg.step2.lr == 1e-6  # YAML 1.1 reads 1e-6 as a string; numbers still parse
    assert cfg.data.augment.jpeg_quality == (50, 60)
    assert cfg.loss.m1 == Config().loss.m1  # untouched keys keep their defaults


def test_flat_params_round_trip_through_dict():
    cfg = load_config([DEFAULT], ["loss.m3=0.1", "flow.name=x"])
    flat = cfg.flat()
    assert flat["loss.m3"] == 0.1 and flat["flow.name"] == "x" and flat["data.augment.jpeg_quality"] == [40, 90]
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.m4=1"], "unknown key 'loss.m4'"),
        (["model.backbone=resnet9000"], "model.backbone: unknown backbone 'resnet9000'"),
        (["step1.epochs=two"], "step1.epochs must be an integer"),
        (["loss.m2=2.0"], "loss.m2: must be in [0, pi/2)"),
        (["loss.m1=0"], "loss.m1: must be > 0"),
        (["loss.scale=-1"], "loss.scale: must be > 0"),
        (["step3.init=maybe"], "step3.init: must be 'scratch' or 'continue'"),
        (["scaling.amp=fp32"], "scaling.amp: must be none, bf16 or fp16"),
        (["data.train=/some/where"], "data.val: a held-out dataset URI is required"),
        (["data.augment.crop_scale_min=0"], "crop_scale_min must be in (0, 1]"),
        (["model.width_mult=null"], "model.width_mult is missing a value"),
        (["nonsense"], "expected key.sub=value"),
        (["tracking.registered_model=team/eqface"], "tracking.registered_model: must be a name of letters"),
        (["tracking.registered_model=''"], "tracking.registered_model: must be a name of letters"),
    ],
)
def test_bad_config_gives_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config([DEFAULT], overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("head", ["full", "sharded"])
def test_both_heads_take_the_configs_one_margin(head):
    """loss.* -> LossConfig -> Margin -> the formula: the heads keep no margin settings of their own."""
    cfg = load_config([DEFAULT], ["loss.m2=0.41", "loss.m3=0.05", "loss.scale=24", f"model.head={head}"])
    built = cfg.model.build_head(10, cfg.loss)
    assert built.margin == Margin(scale=24.0, m1=1.0, m2=0.41, m3=0.05, form="outside", focal_gamma=0.0)
    assert set(vars(built)) & {"scale", "m1", "m2", "m3", "form", "focal_gamma"} == set()


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "missing.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML"):
        load_config([broken])
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config([listy])


def test_training_plan_reads_like_the_paper():
    assert [(s.kind, s.loop) for s in training_plan(1)] == [(1, 0), (2, 0), (3, 0), (2, 1)]
    assert [s.kind for s in training_plan(2)] == [1, 2, 3, 2, 3, 2]
    assert [s.kind for s in training_plan(0)] == [1, 2]
    assert [s.index for s in training_plan(2)] == list(range(6))
