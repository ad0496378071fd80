"""Converter: layouts, safety, strictness, and all-or-nothing output."""

import argparse
import json
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import save_file

from diffmoe_hf import ClassConditionalMoEPipeline, DSMoETransformer2DModel
from diffmoe_hf.conversion import CheckpointError, convert_checkpoint, load_original_checkpoint

from .helpers import dsmoe_case, unwritable_folder


CASE = dsmoe_case()
CONFIG = os.path.join(CASE, "config.yaml")
CHECKPOINT = os.path.join(CASE, "checkpoint.pt")


def _convert(output, checkpoint=CHECKPOINT, **kwargs):
    return convert_checkpoint("dsmoe", checkpoint, str(output), **{"config_path": CONFIG, **kwargs})


def _forward(folder):
    model = DSMoETransformer2DModel.from_pretrained(folder, subfolder="transformer")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        return model(x, torch.tensor([0.3, 0.7]), torch.tensor([1, 10])).sample


def test_layouts_all_give_the_same_model(tmp_path):
    ema = load_original_checkpoint(CHECKPOINT).state_dict
    torch.save({"ema": ema}, tmp_path / "release.pt")
    save_file(ema, tmp_path / "ema.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in ema.items()}, "args": argparse.Namespace()}, tmp_path / "m.pt")
    reference = _forward(_convert(tmp_path / "from-train-dict"))
    for name, extra in (("release.pt", {}), ("ema.safetensors", {}), ("m.pt", {"weights": "model"})):
        torch.testing.assert_close(
            _forward(_convert(tmp_path / name.replace(".", "-"), tmp_path / name, **extra)), reference, atol=0, rtol=0
        )


def test_raw_weights_differ_from_ema(tmp_path):
    assert not torch.allclose(
        _forward(_convert(tmp_path / "ema")), _forward(_convert(tmp_path / "raw", weights="model"))
    )


def test_dict_without_ema_asks_for_weights_model(tmp_path):
    torch.save({"model": load_original_checkpoint(CHECKPOINT).state_dict}, tmp_path / "raw-only.pt")
    with pytest.raises(CheckpointError, match="weights='model'"):
        _convert(tmp_path / "out", tmp_path / "raw-only.pt")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", [0, 2, 20, 195])  # random bytes that fail in different places of the unpickler
def test_not_a_checkpoint_is_refused(tmp_path, seed):
    (tmp_path / "junk.pt").write_bytes(random.Random(seed).randbytes(2048))
    with pytest.raises(CheckpointError) as error:
        _convert(tmp_path / "out", tmp_path / "junk.pt")
    message = str(error.value)
    assert f"{tmp_path / 'junk.pt'} is not a PyTorch checkpoint" in message and "download" in message
    assert "weights_only" not in message and "--trust-checkpoint" not in message  # loading it unsafely is no fix
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_unsafe_objects_are_named_in_both_torch_save_formats(tmp_path, zip_format):
    state = load_original_checkpoint(CHECKPOINT).state_dict
    torch.save({"ema": state, "extra": Unsafe()}, tmp_path / "unsafe.pt", _use_new_zipfile_serialization=zip_format)
    refused = r"not safe to unpickle \(tests.test_conversion.Unsafe\).*--trust-checkpoint"
    with pytest.raises(CheckpointError, match=refused):
        _convert(tmp_path / "out", tmp_path / "unsafe.pt")


class Unsafe:
    pass


def test_unknown_pickled_objects_are_refused_unless_trusted(tmp_path):
    state = load_original_checkpoint(CHECKPOINT).state_dict
    torch.save({"ema": state, "extra": Unsafe()}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="trust-checkpoint"):
        _convert(tmp_path / "out", tmp_path / "unsafe.pt")
    _convert(tmp_path / "out", tmp_path / "unsafe.pt", trust_checkpoint=True)
    assert (tmp_path / "out" / "model_index.json").is_file()


def test_omegaconf_objects_load_without_omegaconf():
    loaded = load_original_checkpoint(os.path.join(dsmoe_case("dsmoe-sincos-rms-e8g4k3-noshared"), "checkpoint.pt"))
    assert loaded.source == "ema" and loaded.layout == "training-dict" and loaded.args is not None


def test_mismatched_config_lists_the_problems_and_writes_nothing(tmp_path):
    other = os.path.join(dsmoe_case("dsmoe-rope1d-e6g3k1"), "config.yaml")
    with pytest.raises(CheckpointError) as error:
        _convert(tmp_path / "out", config_path=other)
    message = str(error.value)
    assert "missing" in message and "does not have" in message and "shape mismatches" in message
    assert os.listdir(tmp_path) == []


def test_unknown_source_keys_are_reported(tmp_path):
    state = load_original_checkpoint(CHECKPOINT).state_dict
    state["blocks.0.attn.sinks"] = torch.zeros(4)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"source keys not consumed \(1\):\n    blocks.0.attn.sinks"):
        _convert(tmp_path / "out", tmp_path / "extra.pt")


def test_missing_architecture_is_explained(tmp_path):
    with pytest.raises(CheckpointError, match="--config ORIGINAL.yaml"):
        convert_checkpoint("dsmoe", CHECKPOINT, str(tmp_path / "out"))


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _convert(output)
    assert (output / "keep.txt").read_text() == "user data"
    _convert(output, overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "transformer").is_dir()
    assert [p for p in os.listdir(tmp_path) if p != "out"] == []  # no staging folders left behind


def test_failure_while_saving_leaves_no_partial_folder(tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ClassConditionalMoEPipeline, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _convert(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_bf16_output_keeps_router_fp32_and_loads(tmp_path):
    _convert(tmp_path / "out", dtype="bf16")
    model = DSMoETransformer2DModel.from_pretrained(
        tmp_path / "out", subfolder="transformer", torch_dtype=torch.bfloat16
    )
    block = model.transformer_blocks[1].ff
    assert block.experts[0].up_proj.weight.dtype == torch.bfloat16 and block.router.weight.dtype == torch.float32
    stored = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    assert stored["_class_name"] == "DSMoETransformer2DModel" and stored["formulation"] == "rf-noise-at-0"


def test_folder_contents_and_model_card(tmp_path):
    _convert(tmp_path / "out", max_shard_size="20KB")
    out = tmp_path / "out"
    assert len(list((out / "transformer").glob("*.safetensors"))) > 1
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 1.0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense:") and "arxiv.org/abs/2512.01252" in card and "DSMoE-3B-E16" in card
    pipe = ClassConditionalMoEPipeline.from_pretrained(out)
    assert pipe.labels == {}  # a 10-class model gets no ImageNet names
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))


def test_imagenet_models_get_the_1000_class_names(tmp_path):
    from diffmoe_hf.conversion import build_pipeline

    pipe = build_pipeline(
        DSMoETransformer2DModel(
            sample_size=4,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_experts=4,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
        )
    )
    assert len(pipe.config.id2label) == 1000
    assert pipe.get_label_ids(["golden retriever", "tench"]) == [207, 0]


def test_custom_class_names(tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({str(i): f"digit {i}, number {i}" for i in range(10)}))
    _convert(tmp_path / "out", id2label_path=str(names))
    assert ClassConditionalMoEPipeline.from_pretrained(tmp_path / "out").get_label_ids("number 7") == [7]


def test_vae_is_copied_into_the_folder(tmp_path):
    from .helpers import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae-src")
    _convert(tmp_path / "out", vae_path=str(tmp_path / "vae-src"))
    pipe = ClassConditionalMoEPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    assert pipe(class_labels=[3], num_inference_steps=1).images[0].size == (8, 8)
    shutil.rmtree(tmp_path / "vae-src")


def test_missing_config_file_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.yaml does not exist \(--config\): give the original"):
        _convert(tmp_path / "out", config_path=str(tmp_path / "missing.yaml"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list"),
        ('{"0": "zero"}', "must name exactly the classes 0..9"),
    ],
)
def test_bad_class_name_file_is_named(tmp_path, content, problem):
    names = tmp_path / "names.json"
    names.write_text(content)
    with pytest.raises(ValueError) as error:
        _convert(tmp_path / "out", id2label_path=str(names))
    assert f"Class-name file {names} (--id2label) {problem}" in str(error.value) and '{"0": "tench' in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("folder", ["read-only", "/sys"])
def test_unwritable_output_place_is_refused_before_loading(tmp_path, monkeypatch, folder):
    """A folder without write permission (only a user other than root can check it) and sysfs, which takes no new
    folders even from root."""
    folder = unwritable_folder(tmp_path, folder)
    monkeypatch.setattr("diffmoe_hf.conversion.convert.load_original_checkpoint", _must_not_be_called)
    with pytest.raises(PermissionError, match=f"the folder {folder} does not accept new folders"):
        _convert(os.path.join(folder, "out"))


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("must not be called")
