"""A saved folder whose config.json does not match its weights is refused at load, naming the field or tensors,
through every loader: the transformer's `from_pretrained`, the pipeline's and `diffmoe generate --model`."""

import json
import os
import shutil

import pytest

from diffmoe_hf import ClassConditionalMoEPipeline, DSMoETransformer2DModel
from diffmoe_hf.cli import main
from diffmoe_hf.conversion import convert_checkpoint
from diffmoe_hf.models import modeling_common
from diffmoe_hf.models.folder_checks import key_patterns

from .helpers import dsmoe_case


CASE = dsmoe_case()  # 4 blocks, MoE in blocks 1 and 3, 8 experts, 32 wide


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("converted") / "dsmoe")
    return convert_checkpoint(
        "dsmoe", os.path.join(CASE, "checkpoint.pt"), output, config_path=os.path.join(CASE, "config.yaml")
    )


def _edit_config(folder, **changes):
    path = os.path.join(folder, "transformer", "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**config, **changes}, f)


def _remove(folder, name):
    os.remove(os.path.join(folder, "transformer", name))


def _shard(folder):
    """Re-saves the transformer in shards of 20 kB and removes the second shard."""
    model = DSMoETransformer2DModel.from_pretrained(folder, subfolder="transformer")
    shutil.rmtree(os.path.join(folder, "transformer"))
    model.save_pretrained(os.path.join(folder, "transformer"), max_shard_size="20KB")
    (second,) = [name for name in os.listdir(os.path.join(folder, "transformer")) if "-00002-of-" in name]
    _remove(folder, second)


# case id, how the folder is damaged, fragments of the message
FOLDER_CASES = [
    (
        "more-blocks",
        lambda folder: _edit_config(folder, num_layers=6),
        [
            "config num_layers=6 but the weights have transformer_blocks.0..3",
            "lack (28):\n    transformer_blocks.4..5.*",
        ],
    ),
    (
        "fewer-blocks",
        lambda folder: _edit_config(folder, num_layers=2, moe_layers=[1]),
        ["config num_layers=2 but the weights have transformer_blocks.0..3", "transformer_blocks.2.*"],
    ),
    (
        "fewer-experts",
        lambda folder: _edit_config(folder, num_experts=4),
        [
            "has no place for (24):\n    transformer_blocks.[1,3].ff.experts.4..7.*",
            "tensor transformer_blocks.1.ff.router.weight has shape [8, 32], the config implies [4, 32]",
        ],
    ),
    (
        "wider",
        lambda folder: _edit_config(folder, attention_head_dim=16),
        ["tensor embedding.class_embedder.embedding_table.weight has shape [11, 32], the config implies [11, 64]"],
    ),
    (
        "negative-size",
        lambda folder: _edit_config(folder, num_layers=-2),
        [os.path.join("transformer", "config.json") + " describes no valid DSMoETransformer2DModel:"],
    ),
    (
        "no-weights",
        lambda folder: _remove(folder, "diffusion_pytorch_model.safetensors"),
        ["has a config.json but no weights: diffusion_pytorch_model.safetensors (or a sharded"],
    ),
    (
        "missing-shard",
        _shard,
        ["is missing diffusion_pytorch_model-00002-of-", "listed in diffusion_pytorch_model.safetensors.index.json"],
    ),
]
LOADERS = {
    "transformer": lambda folder: DSMoETransformer2DModel.from_pretrained(folder, subfolder="transformer"),
    "pipeline": ClassConditionalMoEPipeline.from_pretrained,
}


@pytest.mark.parametrize("case, damage, fragments", FOLDER_CASES, ids=[case[0] for case in FOLDER_CASES])
def test_mismatched_folder_is_refused_at_load_by_every_loader(tmp_path, converted, capsys, case, damage, fragments):
    folder = str(tmp_path / case)
    shutil.copytree(converted, folder)
    damage(folder)
    for name, load in LOADERS.items():
        with pytest.raises((ValueError, FileNotFoundError)) as error:
            load(folder)
        message = str(error.value)
        assert all(fragment in message for fragment in fragments), (name, message)
        assert len(message.splitlines()) <= 16, message  # patterns, not every key name
    assert main(["generate", "--model", folder, "--output", str(tmp_path / "grid.png")]) == 2
    error_output = capsys.readouterr().err
    assert all(fragment in error_output for fragment in fragments), error_output
    assert "Traceback" not in error_output and not (tmp_path / "grid.png").exists()


def test_a_file_given_for_the_folder_is_named(converted):
    weights = os.path.join(converted, "transformer", "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=f"{weights} is a file; from_pretrained takes the model folder"):
        DSMoETransformer2DModel.from_pretrained(weights)


def test_tensors_the_weights_do_not_fill_are_refused_after_loading_from_any_source(tmp_path, converted, monkeypatch):
    """A source the folder check cannot read first (a Hub repo id resolves inside diffusers) is checked after loading:
    an edited config's extra block, which diffusers leaves on the meta device with a warning, is refused."""
    folder = str(tmp_path / "deeper")
    shutil.copytree(converted, folder)
    _edit_config(folder, num_layers=5)
    monkeypatch.setattr(modeling_common, "check_folder_matches_config", lambda *args: None)  # as for a Hub id
    with pytest.raises(ValueError, match=r"no values for \d+ tensors") as error:
        DSMoETransformer2DModel.from_pretrained(folder, subfolder="transformer")
    assert "transformer_blocks.4." in str(error.value) and len(str(error.value).splitlines()) <= 16


def test_intact_folder_loads(converted):
    assert DSMoETransformer2DModel.from_pretrained(converted, subfolder="transformer").config.num_layers == 4


@pytest.mark.parametrize(
    "keys, patterns",
    [
        (["a.weight", "b.0.weight"], ["a.weight", "b.0.weight"]),
        ([f"blocks.{i}.{leaf}" for i in (4, 5) for leaf in ("x", "y.0.z")], ["blocks.4..5.*"]),
        ([f"blocks.{i}.experts.{e}.w" for i in (1, 3) for e in range(4, 8)], ["blocks.[1,3].experts.4..7.w"]),
        ([f"blocks.{i}.w" for i in (0, 1, 2, 5, 7, 8)], ["blocks.[0..2,5,7..8].w"]),
    ],
)
def test_key_patterns(keys, patterns):
    assert key_patterns(keys) == patterns
