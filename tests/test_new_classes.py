"""Fine-tuning a pretrained model on new classes (`--new_classes replace|append`, training/new_classes.py) for every
family: the class table resized with the null row last, old classes untouched by `append`, guidance, training with the
embedding trained in full under LoRA, exact resume, and the output loading with `DiffusionPipeline.from_pretrained`."""

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import diffmoe_hf  # noqa: F401  (registers the pipeline and models with diffusers)
from diffmoe_hf import ClassConditionalMoEPipeline
from diffmoe_hf.cli import CommandError
from diffmoe_hf.formulations import get_formulation
from diffmoe_hf.training.new_classes import (
    has_null_class,
    parse_init_class_from,
    plan_classes,
    resize_class_embedding,
)
from diffmoe_hf.training.parameter_groups import parameter_group

from .helpers import registered_families, tiny_vae
from .training_helpers import NUM_CLASSES, resolution, save_tiny_pipeline, tiny_transformer, train


OLD_NAMES = {str(i): f"class_{i}" for i in range(NUM_CLASSES)}  # save_tiny_pipeline's class names


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def image_folder(root, names: list[str], per_class: int, size: int) -> str:
    """`root/<name>/<j>.png` random RGB images, `per_class` of each class."""
    rng = np.random.default_rng(0)
    for name in names:
        os.makedirs(os.path.join(root, name))
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(f"{root}/{name}/{j}.png")
    return str(root)


def test_plans_of_replace_and_append():
    data = ["class_1", "moon", "star"]
    append = plan_classes("append", data, NUM_CLASSES, OLD_NAMES, {"star": "2"})
    assert append.sources == [0, 1, 2, None, 2]
    assert append.data_ids == {"class_1": 1, "moon": 3, "star": 4}
    assert append.id2label == {**OLD_NAMES, "3": "moon", "4": "star"}
    replace = plan_classes("replace", data, NUM_CLASSES, OLD_NAMES, {"moon": "class_0"})
    assert replace.sources == [1, 0, None]  # class_1 starts from its own row
    assert replace.id2label == {"0": "class_1", "1": "moon", "2": "star"}
    assert replace.data_ids == {"class_1": 0, "moon": 1, "star": 2}
    with pytest.raises(ValueError, match="'class_1' is no new class of the data"):
        plan_classes("append", data, NUM_CLASSES, OLD_NAMES, {"class_1": "0"})
    with pytest.raises(ValueError, match="'sun' is no class of the model"):
        plan_classes("append", data, NUM_CLASSES, OLD_NAMES, {"star": "sun"})
    with pytest.raises(ValueError, match="class_1, 1 are all the model's class 1"):
        plan_classes("append", ["class_1", "1"], NUM_CLASSES, OLD_NAMES)
    assert parse_init_class_from(" star = class_2 ,moon=0") == {"star": "class_2", "moon": "0"}
    for bad in ("star", "star=", "star=1,star=2"):
        with pytest.raises(CommandError, match="--init_class_from"):
            parse_init_class_from(bad)


def _pipeline(transformer):
    vae = tiny_vae() if transformer.config.in_channels == 4 else None
    scheduler = get_formulation(transformer.config.formulation).default_scheduler()
    pipe = ClassConditionalMoEPipeline(transformer=transformer, scheduler=scheduler, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _guided(pipe, labels):
    generator = torch.Generator().manual_seed(0)
    return pipe(labels, num_inference_steps=2, guidance_scale=3.0, generator=generator, output_type="pt").images


@pytest.mark.parametrize("family", registered_families())
def test_append_keeps_old_classes_and_guidance_and_replace_rebuilds_the_table(family):
    model = tiny_transformer(family).eval()
    assert has_null_class(model)
    old_table = model.embedding.class_embedder.embedding_table.weight.detach().clone()
    config = model.config
    x = torch.randn(3, config.in_channels, config.sample_size, config.sample_size, generator=torch.manual_seed(1))
    t = torch.tensor([10, 500, 900]) if config.formulation == "ddpm-learned-sigma" else torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        before = model(x, t, torch.tensor([0, 2, NUM_CLASSES])).sample  # two old classes and the null class
    guided_before = _guided(_pipeline(model), [0, 2])

    resize_class_embedding(model, [0, 1, 2, None, 1])  # append two classes: the mean of the old rows, a copy of 1
    table = model.embedding.class_embedder.embedding_table.weight
    assert model.config.num_classes == 5 and table.shape == (6, old_table.shape[1]) and has_null_class(model)
    assert torch.equal(table[:3], old_table[:3]) and torch.equal(table[5], old_table[NUM_CLASSES])  # null row last
    assert torch.equal(table[3], old_table[:NUM_CLASSES].mean(0)) and torch.equal(table[4], old_table[1])
    with torch.no_grad():  # the old classes and the null class (now id 5) give exactly the outputs they gave
        assert torch.equal(model(x, t, torch.tensor([0, 2, 5])).sample, before)
    pipe = _pipeline(model)
    assert torch.equal(_guided(pipe, [0, 2]), guided_before)  # guidance reaches the moved null row
    assert torch.isfinite(_guided(pipe, [3, 4])).all()

    resize_class_embedding(model, [4, None])  # replace: keep only the appended copy of class 1, plus one new class
    table = model.embedding.class_embedder.embedding_table.weight
    assert model.config.num_classes == 2 and model.embedding.class_embedder.num_classes == 2
    assert torch.equal(table[0], old_table[1]) and torch.equal(table[2], old_table[NUM_CLASSES])


def _trained_transformer(folder):
    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("family", registered_families())
def test_lora_on_new_classes_trains_the_embedding_resumes_exactly_and_loads(family, tmp_path, caplog):
    pretrained = save_tiny_pipeline(str(tmp_path / "pipe"), family)
    data = image_folder(tmp_path / "data", ["class_1", "moon", "star"], 2, resolution(family))
    out, resumed = str(tmp_path / "out"), str(tmp_path / "resumed")
    common = ["--use_lora", "--rank", "2", "--new_classes", "append", "--init_class_from", "star=class_0"]
    common += ["--routers", "trained", "--learning_rate", "1e-2", "--checkpointing_steps", "2"]
    caplog.set_level(logging.INFO)
    train(pretrained, data, out, *common, "--max_train_steps", "3", family=family)
    # the table the script prints: the class embedding and routers in full, attention and experts through LoRA
    table = {line.split("  ")[0]: line.split()[-3:] for line in caplog.text.splitlines() if "  " in line}
    assert table["class embedding"][1] == table["class embedding"][0] and table["attention"][1] == "0"
    assert table["routers"][1] == table["routers"][0] != "0" and table["experts"][2] != "0"

    os.makedirs(resumed)
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    train(
        pretrained,
        data,
        resumed,
        *common,
        "--max_train_steps",
        "3",
        "--resume_from_checkpoint",
        "latest",
        family=family,
    )
    final, again = _trained_transformer(out), _trained_transformer(resumed)
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)

    base = _trained_transformer(pretrained)
    table_key = "embedding.class_embedder.embedding_table.weight"
    assert final[table_key].shape[0] == NUM_CLASSES + 3  # class_1 is the model's; moon and star are new
    assert not torch.equal(final[table_key][:NUM_CLASSES], base[table_key][:NUM_CLASSES])  # trained in full
    routers = [k for k in base if parameter_group(k) == "routers"]
    assert any(not torch.equal(final[k], base[k]) for k in routers)
    assert not any("lora" in k for k in final)  # the adapter is merged
    for cls in (DiffusionPipeline, ClassConditionalMoEPipeline):
        pipe = cls.from_pretrained(out)
        assert pipe.transformer.config.num_classes == NUM_CLASSES + 2
        assert pipe.config.id2label == {**OLD_NAMES, "3": "moon", "4": "star"}
    assert "no `load_lora_weights` on the base model" in open(os.path.join(out, "README.md")).read()


@pytest.mark.parametrize("family", registered_families())
def test_full_fine_tuning_replaces_the_classes_of_a_one_class_folder_of_few_images(family, tmp_path, caplog):
    pretrained = save_tiny_pipeline(str(tmp_path / "pipe"), family)
    data = image_folder(tmp_path / "data", ["comet"], 3, resolution(family))
    out = str(tmp_path / "out")
    with pytest.raises(CommandError, match="--new_classes replace"):
        train(pretrained, data, out, "--max_train_steps", "1", family=family)
    caplog.set_level(logging.INFO)
    extra = ["--new_classes", "replace", "--train_batch_size", "8", "--max_train_steps", "2"]
    train(pretrained, data, out, *extra, family=family)
    assert "fewer than one batch of 8: each epoch goes through them 3 times" in caplog.text
    pipe = DiffusionPipeline.from_pretrained(out)
    assert pipe.config.id2label == {"0": "comet"} and pipe.transformer.config.num_classes == 1
    assert pipe.transformer.embedding.class_embedder.embedding_table.num_embeddings == 2  # comet and the null class


def test_lora_expert_parts_select_projections_of_every_expert_layout():
    from diffmoe_hf.training.train_class_conditional import lora_target_modules

    down = lora_target_modules(tiny_transformer("dynamic-token-moe"), ["experts", "shared_experts"], ("down",))
    assert (
        down
        == r"transformer_blocks\.\d+\.ff\.experts\.\d+\.net\.2|transformer_blocks\.\d+\.ff\.shared_experts\.net\.2"
    )
    up = lora_target_modules(tiny_transformer("dsmoe"), ["experts"], ("up",))
    assert (
        up
        == r"transformer_blocks\.\d+\.ff\.experts\.\d+\.gate_proj|transformer_blocks\.\d+\.ff\.experts\.\d+\.up_proj"
    )
    modulation = lora_target_modules(tiny_transformer("spatial-temporal-moe"), ["experts"], ("modulation",))
    assert "modulation\\.linear_1" in modulation and "proj" not in modulation


def test_journey_from_a_folder_of_new_classes_to_fid(tmp_path):
    """The README's journey on a few images: fine-tune the shipped digits model on a folder of new classes (LoRA),
    `diffmoe generate` them by name, `diffmoe sample`, `diffmoe evaluate` against the folder, the Space's choices."""
    import json

    import torch

    from diffmoe_hf.cli import main as diffmoe
    from diffmoe_hf.embedded_models import default_models
    from diffmoe_hf.space.app import load_models
    from diffmoe_hf.training.shapes_data import write_shapes_image_folder
    from diffmoe_hf.training.train_class_conditional import run

    from .helpers import random_inception_state_dict

    data, out = str(tmp_path / "shapes"), str(tmp_path / "my-shapes")
    write_shapes_image_folder(data, per_class=2)  # circle/, cross/, square/, triangle/: 8 images, fewer than a batch
    train = ["--pretrained_model_name_or_path", default_models()["digits-jitmoe"], "--train_data_dir", data]
    train += ["--resolution", "16", "--output_dir", out, "--use_lora", "--new_classes", "replace"]
    train += ["--max_train_steps", "2", "--validation_epochs", "0", "--report_to", "none", "--seed", "0"]
    try:
        assert run(train) == 0
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
    common = ["--model", out, "--steps", "2"]
    assert diffmoe(["generate", *common, "--classes", "cross", "circle", "--output", str(tmp_path / "g.png")]) == 0
    samples = str(tmp_path / "samples.npz")
    assert diffmoe(["sample", *common, "--num-samples", "5", "--output", samples, "--no-progress"]) == 0
    weights = str(tmp_path / "inception.pth")
    torch.save(random_inception_state_dict(), weights)
    record = str(tmp_path / "fid.json")
    evaluate = ["evaluate", samples, "--reference", data, "--inception-weights", weights, "--output", record]
    assert diffmoe([*evaluate, "--allow-nonstandard-weights", "--no-progress"]) == 0
    result = json.load(open(record))
    assert result["reference"]["count"] == 8 and result["samples"]["count"] == 5 and result["metrics"]["fid"] > 0
    choices = load_models({"mine": out}, "cpu")["mine"].class_choices()
    assert choices == [("0: circle", "0"), ("1: cross", "1"), ("2: square", "2"), ("3: triangle", "3")]
