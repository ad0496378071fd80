"""The names a user types: family ids with their aliases, preset keys with theirs, and the messages naming them."""

import os

import pytest
import torch

from diffmoe_hf import DiTMoETransformer2DModel
from diffmoe_hf.cli import build_parser, main
from diffmoe_hf.conversion import FamilyConverter, convert_checkpoint
from diffmoe_hf.conversion.checkpoint_io import CheckpointError, LoadedCheckpoint, load_original_checkpoint
from diffmoe_hf.conversion.convert_dit_moe import original_dit_moe_state_dict
from diffmoe_hf.conversion.convert_dynamic_token_moe import build_dynamic_token_moe_transformer
from diffmoe_hf.families import FAMILIES, FAMILY_ALIASES, family_names, get_family, published_settings, resolve_family
from diffmoe_hf.models.presets import resolve_preset

from .conftest import parity_root


# family id -> (model class, preset table, alias table, the paper's model name, which every preset key starts with)
PRESET_TABLES = {
    family.id: (family.model_class, family.presets, family.preset_aliases, family.paper.split(",")[0])
    for family in FAMILIES.values()
}
# the original code of DiT-MoE and of Diff-MoE (Cheng et al.) both name their architectures `DiT_models["DiT-XL/2"]`
# etc.; each family accepts these names for its own architectures, which is the only name two families share
ORIGINAL_DIT_NAMES = {f"DiT-{size}/{patch}" for size in ("S", "B", "L", "XL") for patch in (2, 4, 8)} | {"DiT-G/2"}


def test_every_family_has_a_converter_a_class_and_a_preset_table():
    for family in FAMILIES.values():
        assert isinstance(family.load_converter(), FamilyConverter), family.id
        assert family.class_name == family.model_class.__name__ and family.presets, family.id


def test_family_ids_and_aliases_resolve():
    assert FAMILY_ALIASES == {"diff-moe": "spatial-temporal-moe", "diffmoe-dts": "dynamic-token-moe"}
    for family_id in FAMILIES:
        assert resolve_family(family_id) == family_id
    for alias, family_id in FAMILY_ALIASES.items():
        assert resolve_family(alias) == family_id and alias not in FAMILIES
    assert family_names() == [*FAMILIES, *FAMILY_ALIASES]


def test_unknown_family_lists_the_ids_with_their_aliases(tmp_path):
    with pytest.raises(ValueError) as error:
        convert_checkpoint("diffmoe", tmp_path / "checkpoint.pt", tmp_path / "out")
    message = str(error.value)
    assert message.startswith("Unknown model family 'diffmoe'; supported: ")
    assert "spatial-temporal-moe (alias: diff-moe): Diff-MoE, Cheng et al." in message
    assert "dynamic-token-moe (alias: diffmoe-dts): DiffMoE, Shi et al. 2025" in message
    assert all(family_id in message for family_id in FAMILIES)
    assert not (tmp_path / "out").exists()


def test_convert_help_lists_every_family_with_aliases_paper_and_class(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["convert", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for family in FAMILIES.values():
        assert family.class_name in help_text and family.paper in help_text
    assert "spatial-temporal-moe (alias: diff-moe)\n      Diff-MoE, Cheng et al.:" in help_text
    assert "dynamic-token-moe (alias: diffmoe-dts)\n      DiffMoE, Shi et al. 2025:" in help_text


@pytest.mark.parametrize("name", family_names())
def test_cli_accepts_every_family_id_and_alias(name):
    args = build_parser().parse_args(["convert", name, "--checkpoint", "c.pt", "--output", "out"])
    assert args.family == name


def _convert_both_ways(tmp_path, case: str, config: str, alias: str, family_id: str) -> tuple[str, str]:
    """Converts `case` with `diffmoe convert ALIAS` and with `convert_checkpoint(FAMILY_ID)`: the two folders."""
    checkpoint, config = os.path.join(case, "checkpoint.pt"), os.path.join(case, config)
    by_alias, by_id = str(tmp_path / "by-alias"), str(tmp_path / "by-id")
    assert main(["convert", alias, "--checkpoint", checkpoint, "--config", config, "--output", by_alias]) == 0
    convert_checkpoint(family_id, checkpoint, by_id, config_path=config)
    return by_alias, by_id


def _files(folder: str) -> dict[str, bytes]:
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return files


@pytest.mark.parametrize(
    "case, config, alias, family_id",
    [
        ("diff-moe-ddpm-s-e4k2", "source.json", "diff-moe", "spatial-temporal-moe"),
        ("diffmoe-dts-e4-cap", "config.yaml", "diffmoe-dts", "dynamic-token-moe"),
    ],
)
def test_convert_with_an_alias_writes_the_same_folder(tmp_path, case, config, alias, family_id):
    case = os.path.join(parity_root(), case)
    if not os.path.isdir(case):
        pytest.fail(f"parity fixture {case} is missing")
    by_alias, by_id = map(_files, _convert_both_ways(tmp_path, case, config, alias, family_id))
    assert any(name.endswith(".safetensors") for name in by_alias)
    assert sorted(by_alias) == sorted(by_id)
    for name in by_alias:  # weights, configs and model card byte for byte
        assert by_alias[name] == by_id[name], name
    assert f"`diffmoe convert {family_id}`".encode() in by_alias["README.md"]  # the card gives the current id


def test_no_preset_name_belongs_to_two_families():
    names = {family: set(presets) | set(aliases) for family, (_, presets, aliases, _) in PRESET_TABLES.items()}
    families = list(PRESET_TABLES)
    for i, first in enumerate(families):
        for second in families[i + 1 :]:
            shared = names[first] & names[second]
            # keys never collide; only the original DiT names are aliases in both DiT-style families
            assert not shared & (set(PRESET_TABLES[first][1]) | set(PRESET_TABLES[second][1])), (first, second)
            if {first, second} == {"spatial-temporal-moe", "dit-moe"}:
                assert shared == ORIGINAL_DIT_NAMES
            else:
                assert not shared, (first, second, shared)


def test_preset_keys_name_their_family_and_aliases_point_at_keys():
    for family, (_, presets, aliases, prefixes) in PRESET_TABLES.items():
        assert all(key.startswith(prefixes) for key in presets), family
        assert not set(aliases) & set(presets), family
        assert set(aliases.values()) <= set(presets), family


@pytest.mark.parametrize("family", list(PRESET_TABLES))
def test_every_alias_gives_the_architecture_of_its_key(family):
    model_class, presets, aliases, _ = PRESET_TABLES[family]
    for alias, key in aliases.items():
        assert resolve_preset(get_family(family).label, presets, alias, aliases) == key
    if aliases:  # through from_preset: the smallest architecture of the family, on the meta device
        alias = min(aliases, key=lambda name: presets[aliases[name]]["num_layers"])
        with torch.device("meta"):
            assert model_class.from_preset(alias).config == model_class.from_preset(aliases[alias]).config


@pytest.mark.parametrize("family", list(PRESET_TABLES))
def test_unknown_preset_names_the_family_and_lists_keys_and_aliases(family):
    model_class, presets, aliases, _ = PRESET_TABLES[family]
    other = "DSMoE-S-E16" if family != "dsmoe" else "DiffMoE-S-E16"  # another family's preset
    with pytest.raises(ValueError) as error:
        model_class.from_preset(other)
    message = str(error.value)
    assert message.startswith(f"Unknown {get_family(family).label} preset {other!r}; available: ")
    assert all(key in message for key in presets)
    assert all(f"{alias} = {key}" in message for alias, key in aliases.items())


def test_labels_keep_diff_moe_and_diffmoe_apart():
    assert get_family("diff-moe").label == "SpatialTemporalMoE (Diff-MoE, Cheng et al.)"
    assert get_family("diffmoe-dts").label == "DynamicTokenMoE (DiffMoE, Shi et al. 2025)"


def test_converter_preset_error_names_the_family():
    case = os.path.join(parity_root(), "diffmoe-dts-e4-cap")
    if not os.path.isdir(case):
        pytest.fail(f"parity fixture {case} is missing")
    checkpoint = load_original_checkpoint(os.path.join(case, "checkpoint.pt"))
    with pytest.raises(
        CheckpointError, match=r"Unknown DynamicTokenMoE \(DiffMoE, Shi et al. 2025\) preset 'DiT-S/2'"
    ):
        build_dynamic_token_moe_transformer(checkpoint, preset="DiT-S/2")
    with pytest.raises(CheckpointError, match=r"^DynamicTokenMoE \(DiffMoE, Shi et al. 2025\) checkpoints do not"):
        build_dynamic_token_moe_transformer(checkpoint)


def _checkpoint(state_dict) -> LoadedCheckpoint:
    return LoadedCheckpoint(dict(state_dict), "ema", "bare-state-dict", None)


def test_converter_preset_takes_the_original_name_and_the_key():
    from diffmoe_hf.conversion.convert_dit_moe import dit_moe_config

    with torch.device("meta"):
        source = original_dit_moe_state_dict(
            DiTMoETransformer2DModel.from_preset("DiT-MoE-S/2")
        )  # meta tensors: shapes only
    options = dict(experts_per_token=2, formulation="ddpm")
    by_key = dit_moe_config(_checkpoint(source), preset="DiT-MoE-S/2", **options)
    assert dit_moe_config(_checkpoint(source), preset="DiT-S/2", **options) == by_key
    assert by_key["num_layers"] == 12 and by_key["num_attention_heads"] == 6
    with pytest.raises(CheckpointError, match=r"Unknown DiTMoE \(DiT-MoE, Fei et al. 2024\) preset 'Diff-MoE-S/2'"):
        dit_moe_config(_checkpoint(source), preset="Diff-MoE-S/2", **options)


@pytest.mark.parametrize("name", family_names())
def test_training_takes_every_family_id_and_alias(name):
    from diffmoe_hf.training.train_class_conditional import parse_args

    preset = next(iter(get_family(resolve_family(name)).presets))
    args = parse_args(["--preset", preset, "--model_family", name, "--train_data_dir", "."])
    assert args.model_family == resolve_family(name)


def test_dit_moe_releases_go_by_their_published_names():
    from diffmoe_hf.conversion.convert_dit_moe import DIT_MOE_RELEASE_NAMES, dit_moe_config

    assert set(DIT_MOE_RELEASE_NAMES) == {s.name for s in published_settings() if s.family == "dit-moe"}
    with torch.device("meta"):
        source = original_dit_moe_state_dict(DiTMoETransformer2DModel.from_preset("DiT-MoE-S/2", num_experts=8))
    by_name = dit_moe_config(_checkpoint(source), preset="DiT-MoE-S/2-8E2A")
    assert by_name == dit_moe_config(_checkpoint(source), preset="dit_moe_s_8E2A")
    assert by_name["num_experts_per_tok"] == 2 and by_name["formulation"] == "ddpm-learned-sigma"
