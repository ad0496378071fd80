"""`diffmoe convert` refuses a user's mistake with one line-led message and exit status 2 before it loads the
checkpoint (or, for what only the weights show, before it writes anything), and leaves nothing behind."""

import os
import pickle
import shutil

import pytest
import torch

from diffmoe_hf.cli import main
from diffmoe_hf.conversion import load_original_checkpoint

from .helpers import dsmoe_case, tiny_vae


CASE = dsmoe_case()
CHECKPOINT = os.path.join(CASE, "checkpoint.pt")
CONFIG = os.path.join(CASE, "config.yaml")


def _weights():
    return load_original_checkpoint(CHECKPOINT).state_dict


def _non_finite(folder):
    weights = _weights()
    weights["x_embedder.proj.weight"][0] = float("nan")
    weights["t_embedder.mlp.0.bias"][:3] = float("inf")
    torch.save({"ema": weights}, folder / "nan.pt")
    return ["--checkpoint", str(folder / "nan.pt")]


def _beyond_fp16(folder):
    weights = _weights()
    weights["x_embedder.proj.weight"].view(-1)[0] = 1e6
    torch.save({"ema": weights}, folder / "big.pt")
    return ["--checkpoint", str(folder / "big.pt"), "--dtype", "fp16"]


def _plain_pickle(folder):
    with open(folder / "plain.pkl", "wb") as f:
        pickle.dump({"ema": _weights()}, f)
    return ["--checkpoint", str(folder / "plain.pkl")]


def _converted_folder(folder):
    converted = folder / "converted"
    assert main(["convert", "dsmoe", "--checkpoint", CHECKPOINT, "--config", CONFIG, "--output", str(converted)]) == 0
    return converted


def _vae_folder(folder):
    tiny_vae().save_pretrained(folder / "vae")
    return folder / "vae"


def _edited_vae(folder):
    vae = _vae_folder(folder)
    config = (vae / "config.json").read_text().replace('"latent_channels": 4', '"latent_channels": 8')
    (vae / "config.json").write_text(config)
    return ["--vae", str(vae)]


# case id, the arguments it adds (made in a scratch folder), fragment of the message
CASES = [
    ("nan-weights", _non_finite, "'ema' weights hold NaN or infinite values in 2 tensors"),
    ("nan-counts", _non_finite, "t_embedder.mlp.0.bias: 3 of 32 values"),
    ("fp16-overflow", _beyond_fp16, "--dtype fp16: values beyond the range of fp16 in 1 tensor"),
    ("plain-pickle", _plain_pickle, "is a plain Python pickle (written with pickle.dump, not torch.save)"),
    ("checkpoint-folder", lambda f: ["--checkpoint", CASE], "is a folder: give the checkpoint file inside it"),
    ("converted-folder", lambda f: ["--checkpoint", str(_converted_folder(f))], "is a converted diffusers folder"),
    ("config-folder", lambda f: ["--config", CASE], f"--config {CASE} is a folder: give the file"),
    ("id2label-folder", lambda f: ["--id2label", CASE], f"--id2label {CASE} is a folder"),
    (
        "shard-size-word",
        lambda f: ["--max-shard-size", "abc"],
        "--max-shard-size 'abc' is not a size: give a positive",
    ),
    ("shard-size-no-unit", lambda f: ["--max-shard-size", "5000"], "--max-shard-size '5000' is not a size"),
    ("shard-size-zero", lambda f: ["--max-shard-size", "0GB"], "--max-shard-size '0GB' is not a size"),
    ("vae-missing", lambda f: ["--vae", "./no-such-vae"], "--vae ./no-such-vae: there is no such folder"),
    ("vae-file", lambda f: ["--vae", CONFIG], f"--vae {CONFIG} is a file: give the AutoencoderKL folder"),
    (
        "vae-not-a-vae",
        lambda f: ["--vae", str(_converted_folder(f) / "transformer")],
        "holds a DSMoETransformer2DModel (its config.json), not an AutoencoderKL",
    ),
    ("vae-pipeline", lambda f: ["--vae", str(_converted_folder(f))], "is a pipeline folder; it has no vae/ folder"),
    ("vae-edited", _edited_vae, "the config implies"),
]

# the cases that only the checkpoint file shows; every other one is refused before the checkpoint is read
FOUND_BY_READING_THE_CHECKPOINT = {
    "nan-weights",
    "nan-counts",
    "fp16-overflow",
    "plain-pickle",
    "checkpoint-folder",
    "converted-folder",
}


@pytest.mark.parametrize("case, arguments, fragment", CASES, ids=[case[0] for case in CASES])
def test_convert_refuses_with_a_message(tmp_path, capsys, monkeypatch, case, arguments, fragment):
    scratch = tmp_path / "inputs"
    scratch.mkdir()
    added = arguments(scratch)
    if case not in FOUND_BY_READING_THE_CHECKPOINT:
        monkeypatch.setattr("diffmoe_hf.conversion.convert.load_original_checkpoint", _must_not_be_called)
    command = ["convert", "dsmoe", "--checkpoint", CHECKPOINT, "--config", CONFIG, "--output", str(tmp_path / "out")]
    assert main(command + added) == 2
    error = capsys.readouterr().err
    assert error.startswith("diffmoe convert: error: ") and fragment in error, error
    assert sorted(os.listdir(tmp_path)) == ["inputs"]  # no output, no hidden sibling


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded before the arguments were checked")


def test_legacy_torch_save_format_converts_like_the_zip_format(tmp_path):
    torch.save({"ema": _weights()}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name, checkpoint in (("zip", CHECKPOINT), ("legacy", str(tmp_path / "legacy.pt"))):
        command = ["convert", "dsmoe", "--checkpoint", checkpoint, "--config", CONFIG]
        assert main(command + ["--output", str(tmp_path / name)]) == 0
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "zip" / weights).read_bytes() == (tmp_path / "legacy" / weights).read_bytes()


def test_vae_folder_and_shard_sizes_in_the_accepted_form_convert(tmp_path):
    vae = _vae_folder(tmp_path)
    command = ["convert", "dsmoe", "--checkpoint", CHECKPOINT, "--config", CONFIG, "--vae", str(vae)]
    assert main(command + ["--output", str(tmp_path / "out"), "--max-shard-size", "20kb"]) == 0
    assert len([name for name in os.listdir(tmp_path / "out" / "transformer") if name.endswith(".safetensors")]) > 1
    shutil.rmtree(vae)
    assert (tmp_path / "out" / "vae" / "config.json").is_file()


@pytest.mark.parametrize(
    "vae, fragment",
    [
        ("./no-such-vae", "there is no such folder (and it is not a Hub repo id"),
        ("transformer", "not an AutoencoderKL"),
    ],
)
def test_generate_checks_its_vae_the_same_way(tmp_path, capsys, vae, fragment):
    model = _converted_folder(tmp_path)
    vae = vae if vae.startswith(".") else str(model / vae)
    assert main(["generate", "--model", str(model), "--vae", vae, "--output", str(tmp_path / "grid.png")]) == 2
    error = capsys.readouterr().err
    assert fragment in error and "huggingface.co" not in error and not (tmp_path / "grid.png").exists()
