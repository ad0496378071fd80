"""Every registered family, from its registration alone (no family is named here): its tiny model written as the
original code saves it (the converter's inverse), converted with `convert_checkpoint`, loaded the diffusers way
(`DiffusionPipeline.from_pretrained` after `import diffmoe_hf`), sampled, and trained for two steps. A sixth family
registered here (a subclass of an existing class under a new id, with its own converter reference) is picked up by
the CLI, the training script and the registry-driven helpers: one registration is all a family needs."""

import json
import os

import diffusers
import pytest
import torch
from diffusers import DiffusionPipeline, ModelMixin  # noqa: F401 (diffusers looks a model's base class up in its module)
from diffusers.pipelines import pipeline_loading_utils
from safetensors.torch import load_file

from diffmoe_hf import ClassConditionalMoEPipeline, DSMoETransformer2DModel
from diffmoe_hf.cli import build_parser
from diffmoe_hf.conversion import FamilyConverter, convert_checkpoint
from diffmoe_hf.conversion.convert_dsmoe import DSMOE_CONVERTER
from diffmoe_hf.families import FAMILIES, FAMILY_ALIASES, ModelFamily, get_family, register_family
from diffmoe_hf.formulations import FORMULATIONS
from diffmoe_hf.training.train_class_conditional import parse_args

from .helpers import randomize_weights, registered_families, tiny_vae, tiny_variants
from .training_helpers import NUM_CLASSES, make_image_folder, train


def write_original(family_id: str, variant: str | None, folder) -> tuple[torch.nn.Module, dict]:
    """The family's tiny model with random weights, and the `convert_checkpoint` arguments of its original files."""
    family = get_family(family_id)
    torch.manual_seed(0)
    model = randomize_weights(family.tiny_model(variant, num_classes=NUM_CLASSES).eval())
    arguments = family.load_converter().write_original(model, str(folder / "original"))
    names = folder / "id2label.json"  # the class names of `make_image_folder`, for training on its images
    names.write_text(json.dumps({str(i): f"class_{i}" for i in range(NUM_CLASSES)}))
    arguments["id2label_path"] = str(names)
    if model.config.in_channels == 4:  # latent: the folder gets a VAE so that it samples images
        tiny_vae().save_pretrained(folder / "vae")
        arguments["vae_path"] = str(folder / "vae")
    return model, arguments


def convert_and_load(family_id: str, variant: str | None, folder) -> tuple[torch.nn.Module, DiffusionPipeline]:
    """Converts the family's tiny model from its original files and loads the folder with diffusers' own loader."""
    model, arguments = write_original(family_id, variant, folder)
    checkpoint = arguments.pop("checkpoint_path")
    output = convert_checkpoint(family_id, checkpoint, str(folder / "converted"), **arguments)
    return model, DiffusionPipeline.from_pretrained(output)


def check_conversion_and_sampling(family_id: str, variant: str | None, folder) -> str:
    """The converted folder holds the same model (config and weights), loads as the package's pipeline and samples.
    Returns the folder."""
    model, pipe = convert_and_load(family_id, variant, folder)
    family = get_family(family_id)
    assert type(pipe) is ClassConditionalMoEPipeline and type(pipe.transformer) is family.model_class
    public = {key: value for key, value in model.config.items() if not key.startswith("_")}
    assert {key: pipe.transformer.config[key] for key in public} == public
    loaded = pipe.transformer.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded[key], tensor), key
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [0, NUM_CLASSES - 1], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    side = model.config.sample_size
    assert images.shape == (2, 3, side, side) and torch.isfinite(images).all()
    return str(folder / "converted")


def check_training(family_id: str, converted: str, folder) -> None:
    """Two full fine-tuning steps from the converted folder move the weights; the result loads the diffusers way."""
    images = make_image_folder(str(folder / "images"))
    output = str(folder / "trained")
    train(converted, images, output, "--max_train_steps", "2", "--learning_rate", "1e-3", family=family_id)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    before, after = load_file(os.path.join(converted, weights)), load_file(os.path.join(output, weights))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert type(DiffusionPipeline.from_pretrained(output).transformer) is get_family(family_id).model_class


@pytest.mark.parametrize("family, variant", tiny_variants())
def test_every_tiny_variant_converts_loads_and_samples(family, variant, tmp_path):
    check_conversion_and_sampling(family, variant, tmp_path)


@pytest.mark.parametrize("family", registered_families())
def test_every_family_trains_from_its_converted_folder(family, tmp_path):
    converted = check_conversion_and_sampling(family, None, tmp_path)
    check_training(family, converted, tmp_path)


@pytest.mark.parametrize("family", registered_families())
def test_every_registration_is_consistent(family):
    family = get_family(family)
    assert family.formulations and set(family.formulations) <= set(FORMULATIONS)
    for variant in family.tiny:
        with torch.device("meta"):
            model = family.tiny_model(variant)
        assert type(model) is family.model_class and model.config.formulation in family.formulations, variant
    assert set(family.preset_aliases.values()) <= set(family.presets)
    assert all(settings.family == family.id for settings in family.published)
    assert getattr(diffusers, family.class_name) is family.model_class  # registered for diffusers' loaders


# ------------------------------------------------------------------------------------------------------------------
# a sixth family, registered here


class SixthMoETransformer2DModel(DSMoETransformer2DModel):
    """DSMoE under another name: the model file of a new family (as every model file, its module has `ModelMixin`)."""


def build_sixth_transformer(checkpoint, config_path: str | None = None, preset: str | None = None):
    """The new family's converter: DSMoE's, building the new class."""
    dsmoe = DSMOE_CONVERTER.build(checkpoint, config_path=config_path, preset=preset)
    model = SixthMoETransformer2DModel.from_config(dsmoe.config)
    model.load_state_dict(dsmoe.state_dict())
    return model.eval()


SIXTH_CONVERTER = FamilyConverter(build_sixth_transformer, DSMOE_CONVERTER.model_card, DSMOE_CONVERTER.write_original)


@pytest.fixture
def sixth_family():
    family = register_family(
        ModelFamily(
            "sixth-moe",
            SixthMoETransformer2DModel,
            "SixthMoE, a test",
            "DSMoE under another name",
            label="SixthMoE (a test)",
            converter=f"{__name__}:SIXTH_CONVERTER",
            formulations=("rf-noise-at-0",),
            presets={},
            tiny=get_family("dsmoe").tiny,
            aliases=("sixth",),
        )
    )
    yield family
    del FAMILIES[family.id], FAMILY_ALIASES["sixth"]
    delattr(diffusers, family.class_name)
    del pipeline_loading_utils.LOADABLE_CLASSES[SixthMoETransformer2DModel.__module__]


def test_one_registration_makes_a_sixth_family(sixth_family, tmp_path, capsys):
    assert "sixth-moe" in registered_families() and ("sixth-moe", "default") in tiny_variants()
    args = build_parser().parse_args(["convert", "sixth", "--checkpoint", "c.pt", "--output", "out"])
    assert args.family == "sixth"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--help"])
    assert "sixth-moe (alias: sixth)\n      SixthMoE, a test" in capsys.readouterr().out
    training_args = ["--pretrained_model_name_or_path", "x", "--model_family", "sixth", "--train_data_dir", "."]
    assert parse_args(training_args).model_family == "sixth-moe"
    test_every_registration_is_consistent("sixth-moe")
    converted = check_conversion_and_sampling("sixth-moe", None, tmp_path)
    check_training("sixth-moe", converted, tmp_path)


def test_a_taken_name_is_refused():
    dsmoe = get_family("dsmoe")
    with pytest.raises(ValueError, match="diff-moe already name a registered family"):
        register_family(ModelFamily(**{**vars(dsmoe), "id": "new", "aliases": ("diff-moe",)}))
    assert "new" not in FAMILIES
