"""Loading the diffusers way: after `import diffmoe_hf`, diffusers' own loaders load every folder the package writes.

Runs on the lowest (CI: `PYTHONPATH=<diffusers==0.37.0 --target dir>`) and the highest diffusers version the package
declares. The simulated Hub serves repo ids from a local Hugging Face cache (no network): `hub_repo` writes a snapshot
and `hub_listing` also answers diffusers' `model_info` call with the snapshot's files, so `DiffusionPipeline.download`
runs its online path, including the check of every component library in `model_index.json`.
"""

import json
import os
import shutil
import types

import diffusers
import huggingface_hub.constants
import pytest
import torch
from diffusers import AutoModel, DiffusionPipeline
from diffusers.pipelines import pipeline_loading_utils, pipeline_utils
from diffusers.utils import dynamic_modules_utils

import diffmoe_hf
from diffmoe_hf import ClassConditionalMoEPipeline, default_models
from diffmoe_hf.conversion import apply_hub_layout, convert_checkpoint
from diffmoe_hf.diffusers_registration import register_classes_in_diffusers_namespace

from .helpers import dsmoe_case, registered_families
from .pipeline_families import family_pipeline


MODEL_CLASSES = tuple(family.model_class for family in diffmoe_hf.FAMILIES.values())
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sample(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    output_type = "pt" if pipe.vae is not None or pipe.transformer.config.in_channels in (1, 3) else "latent"
    return pipe(
        class_labels=[1, 2], num_inference_steps=2, output_type=output_type, generator=torch.manual_seed(0), **kwargs
    ).images


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_repo(tmp_path, offline):
    """`hub_repo(folder, repo_id)` publishes `folder` as `repo_id` in a local Hub cache and returns the cache dir."""
    cache = tmp_path / "hub-cache"

    def publish(folder, repo_id="diffmoe-test/tiny"):
        storage = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, storage / "snapshots" / COMMIT)
        (storage / "refs").mkdir(parents=True)
        (storage / "refs" / "main").write_text(COMMIT)
        return str(cache)

    return publish


@pytest.fixture
def hub_listing(monkeypatch):
    """Answers diffusers' `model_info(repo_id)` with the files of the repo's cached snapshot (set `.cache`)."""

    def model_info(repo_id, **kwargs):
        cache = hub_listing.cache
        snapshot = os.path.join(cache, f"models--{repo_id.replace('/', '--')}", "snapshots", COMMIT)
        files = [os.path.relpath(os.path.join(d, f), snapshot) for d, _, names in os.walk(snapshot) for f in names]
        return types.SimpleNamespace(sha=COMMIT, siblings=[types.SimpleNamespace(rfilename=f) for f in files])

    monkeypatch.setattr(pipeline_utils, "model_info", model_info)
    monkeypatch.setattr(dynamic_modules_utils, "model_info", model_info)  # remote code: the commit of the repo
    return hub_listing


def test_import_registers_the_classes_diffusers_looks_up():
    """Guards the lookups the loading route relies on (see `diffmoe_hf.diffusers_registration`)."""
    assert diffusers.ClassConditionalMoEPipeline is ClassConditionalMoEPipeline
    for cls in MODEL_CLASSES:
        assert getattr(diffusers, cls.__name__) is cls
        assert cls.__module__ in pipeline_loading_utils.LOADABLE_CLASSES
    index = {
        "_class_name": "ClassConditionalMoEPipeline",
        "transformer": [MODEL_CLASSES[0].__module__, "X"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "vae": [None, None],
    }
    custom, folders = pipeline_loading_utils._get_custom_components_and_folders(
        "org/repo", index, ["model_index.json"]
    )
    assert custom == {} and set(folders) == {"transformer", "scheduler", "vae"}


def test_registration_never_replaces_a_diffusers_class():
    impostor = type("DiTPipeline", (), {"__module__": "somewhere"})
    with pytest.warns(RuntimeWarning, match="defines its own DiTPipeline"):
        register_classes_in_diffusers_namespace([impostor])
    assert diffusers.DiTPipeline is not impostor


@pytest.mark.parametrize("family", registered_families())
def test_diffusion_pipeline_loads_a_saved_folder_of_every_family(tmp_path, family):
    pipe = family_pipeline(family)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ClassConditionalMoEPipeline"
    assert index["transformer"] == [type(pipe.transformer).__module__, type(pipe.transformer).__name__]
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is ClassConditionalMoEPipeline
    torch.testing.assert_close(sample(loaded), sample(pipe), atol=0, rtol=0)
    model = AutoModel.from_pretrained(str(tmp_path), subfolder="transformer")  # a str: diffusers joins it
    assert type(model) is type(pipe.transformer)


@pytest.mark.parametrize("name", sorted(default_models()))
def test_diffusion_pipeline_loads_the_shipped_models(name):
    folder = default_models()[name]
    loaded = DiffusionPipeline.from_pretrained(folder)
    assert type(loaded) is ClassConditionalMoEPipeline
    reference = ClassConditionalMoEPipeline.from_pretrained(folder)
    torch.testing.assert_close(sample(loaded), sample(reference), atol=0, rtol=0)
    assert type(AutoModel.from_pretrained(folder, subfolder="transformer")) is type(reference.transformer)


def test_diffusion_pipeline_loads_converter_output(tmp_path):
    case = dsmoe_case()
    output = tmp_path / "converted"
    convert_checkpoint(
        "dsmoe", os.path.join(case, "checkpoint.pt"), str(output), config_path=os.path.join(case, "config.yaml")
    )
    loaded = DiffusionPipeline.from_pretrained(output)
    torch.testing.assert_close(
        sample(loaded), sample(ClassConditionalMoEPipeline.from_pretrained(output)), atol=0, rtol=0
    )


def test_auto_model_loads_a_training_checkpoint_transformer(tmp_path):
    """Training checkpoints hold `checkpoint-<step>/transformer` without a `model_index.json`."""
    pipe = family_pipeline("dsmoe")
    pipe.transformer.save_pretrained(tmp_path / "checkpoint-2" / "transformer")
    model = AutoModel.from_pretrained(str(tmp_path / "checkpoint-2"), subfolder="transformer")
    assert type(model) is type(pipe.transformer)
    torch.testing.assert_close(model.state_dict(), pipe.transformer.state_dict(), atol=0, rtol=0)


@pytest.mark.parametrize("listing", [False, True], ids=["cache-only", "online-listing"])
def test_hub_repo_loads_with_diffusion_pipeline_our_class_and_auto_model(
    tmp_path, hub_repo, hub_listing, listing, monkeypatch
):
    pipe = family_pipeline("dsmoe")
    pipe.save_pretrained(tmp_path / "repo")
    cache = hub_repo(tmp_path / "repo", "diffmoe-test/tiny-dsmoe")
    hub_listing.cache = cache
    if not listing:
        monkeypatch.undo()  # restore diffusers' model_info: offline, it answers with an error
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    reference = sample(pipe)
    for loader in (DiffusionPipeline, ClassConditionalMoEPipeline):
        loaded = loader.from_pretrained("diffmoe-test/tiny-dsmoe", cache_dir=cache)
        assert type(loaded) is ClassConditionalMoEPipeline
        torch.testing.assert_close(sample(loaded), reference, atol=0, rtol=0)
    model = AutoModel.from_pretrained("diffmoe-test/tiny-dsmoe", subfolder="transformer", cache_dir=cache)
    assert type(model) is type(pipe.transformer)


def test_remote_code_hub_layout_keeps_loading_with_trust_remote_code(tmp_path, hub_repo, hub_listing):
    pipe = family_pipeline("jit")
    pipe.save_pretrained(tmp_path / "repo")
    apply_hub_layout(str(tmp_path / "repo"), "remote_code")
    cache = hub_listing.cache = hub_repo(tmp_path / "repo", "diffmoe-test/tiny-jit-remote")
    loaded = DiffusionPipeline.from_pretrained("diffmoe-test/tiny-jit-remote", cache_dir=cache, trust_remote_code=True)
    assert type(loaded).__name__ == "ClassConditionalMoEPipeline"
    torch.testing.assert_close(sample(loaded), sample(pipe), atol=0, rtol=0)
