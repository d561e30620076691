"""The tower registry is the one description of the towers: every consumer (dry run, FLOPs, freezing, checkpoint
units, conversion) agrees with it, and a freeze flag added to the model config without a registry row fails here."""
import dataclasses
import importlib

from megatron_puffin.models.puffin import CHECKPOINT_MODULES
from megatron_puffin.models.puffin_config import PuffinModelConfig
from megatron_puffin.training import layout, resume
from megatron_puffin.training.towers import (
    BY_NAME,
    CHECKPOINT_TOWERS,
    TOWER_NAMES,
    TOWERS,
    trainable_towers,
)


def test_names_are_unique_and_checkpoint_units_keep_their_metadata_names():
    assert len(set(TOWER_NAMES)) == len(TOWERS) == 6
    # puffin_meta.json "towers" of every checkpoint written so far: these names and module prefixes must not change.
    assert CHECKPOINT_TOWERS == ("llm", "vision", "queries", "dit")
    assert CHECKPOINT_MODULES == {"llm": "llm", "vision": "vision", "queries": "conditioner", "dit": "dit"}
    assert tuple(CHECKPOINT_MODULES) == CHECKPOINT_TOWERS
    # every row of a unit lives in the model submodule the unit's checkpoint keys start with
    assert all(spec.module.split(".")[0] == CHECKPOINT_MODULES[spec.checkpoint] for spec in TOWERS if spec.checkpoint)


def test_every_freeze_flag_of_the_model_config_has_its_tower():
    flags = sorted(f.name for f in dataclasses.fields(PuffinModelConfig) if f.name.startswith("freeze_"))
    assert sorted(s.freeze_flag for s in TOWERS if s.freeze_flag) == flags == sorted(resume.FREEZE_FLAGS)


def test_trainability_follows_the_freeze_flags_in_flops_and_dry_run():
    config = PuffinModelConfig(freeze_vision=True, freeze_dit=True)
    expected = {"llm": True, "vision": False, "projector": True, "queries": True, "dit": False, "vae": False}
    assert trainable_towers(config) == expected
    from megatron_puffin.models.connector.config import ConnectorConfig
    from megatron_puffin.models.dit.config import DiTConfig
    from megatron_puffin.models.llm.config import LLMConfig
    from megatron_puffin.models.vision.config import VisionConfig

    towers = layout.build_towers(LLMConfig(), VisionConfig(), ConnectorConfig(), DiTConfig(), config)
    assert [t.name for t in towers] == [s.label for s in TOWERS]
    assert [t.trainable for t in towers] == [expected[s.name] for s in TOWERS]


def test_converters_and_builders_exist():
    for spec in TOWERS:
        assert callable(spec.builder), spec.name
        if spec.converter:
            importlib.import_module(spec.converter)
    assert BY_NAME["vae"].module is None and BY_NAME["vae"].checkpoint is None
