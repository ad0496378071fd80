"""Published settings: recognised from a converted config, written by the converter, used by `diffmoe sample`."""

import dataclasses
import json
import os

from diffmoe_hf import DSMoETransformer2DModel, JiTTransformer2DModel
from diffmoe_hf.cli import main
from diffmoe_hf.conversion import convert, convert_checkpoint
from diffmoe_hf.families import match_published_settings, published_settings
from diffmoe_hf.models.transformer_dsmoe import DSMOE_PRESETS

from .helpers import dsmoe_case, tiny_vae


def _released_config(model_class, preset):
    """The config a conversion of the released checkpoint has (built on the meta device: no weights)."""
    import torch

    with torch.device("meta"):
        return model_class.from_preset(preset).config


def test_every_released_model_is_recognised_by_its_architecture():
    names = [s.name for s in published_settings()]
    assert len(names) == len(set(names)) == 14
    for preset in DSMOE_PRESETS:
        settings = match_published_settings("dsmoe", _released_config(DSMoETransformer2DModel, preset))
        assert (
            settings.name == preset and settings.protocol == "float-features" and settings.num_inference_steps == 250
        )
    jit = match_published_settings("jit", _released_config(JiTTransformer2DModel, "JiT-B/16-E16"))
    assert jit.name == "JiTMoE-B/16-E16" and jit.guidance_interval == (0.1, 1.0) and jit.results[0].fid == 4.23
    assert match_published_settings("jit", _released_config(JiTTransformer2DModel, "JiT-B/16")) is None  # dense JiT
    assert match_published_settings("dit-moe", _released_config(DSMoETransformer2DModel, "DSMoE-S-E16")) is None


def test_converter_writes_the_settings_and_sample_uses_them(tmp_path, monkeypatch, capsys):
    """The fixture checkpoint stands in for a released one (its architecture is matched to DSMoE-S-E16's entry)."""
    released = match_published_settings("dsmoe", _released_config(DSMoETransformer2DModel, "DSMoE-S-E16"))
    stand_in = dataclasses.replace(released, num_inference_steps=2, guidance_scale=1.25)
    monkeypatch.setattr(convert, "match_published_settings", lambda family, config: stand_in)
    case = dsmoe_case()
    tiny_vae().save_pretrained(tmp_path / "vae")
    folder = convert_checkpoint(
        "dsmoe",
        os.path.join(case, "checkpoint.pt"),
        str(tmp_path / "m"),
        config_path=os.path.join(case, "config.yaml"),
        vae_path=str(tmp_path / "vae"),
    )
    recorded = json.loads(open(os.path.join(folder, "published_settings.json")).read())
    assert recorded["sampling"] == {
        "num_inference_steps": 2,
        "guidance_scale": 1.25,
        "scheduler": "FlowMatchEulerDiscreteScheduler",
    }
    assert json.loads(open(os.path.join(folder, "model_index.json")).read())["default_guidance_scale"] == 1.25
    card = open(os.path.join(folder, "README.md")).read()
    assert "## Published evaluation (DSMoE-S-E16)" in card and "| ImageNet 256x256 | 1.5 | 14.53 |" in card
    sample = ["sample", "--model", folder, "--num-samples", "2", "--batch-size", "2", "--no-progress", "--output"]
    assert main([*sample, str(tmp_path / "a.npz")]) == 0
    assert '{"guidance_scale": 1.25, "num_inference_steps": 2}' in capsys.readouterr().out
    assert main([*sample, str(tmp_path / "b.npz"), "--steps", "1", "--guidance-scale", "1.0"]) == 0  # the user wins
    assert '{"guidance_scale": 1.0, "num_inference_steps": 1}' in capsys.readouterr().out
