"""What train_class_conditional.py does with its inputs: class folders map to the model's class ids (or are refused),
unreadable images are found before training, and nothing contacts the network unless asked."""

import os
import shutil

import pytest
from accelerate.state import AcceleratorState

from diffmoe_hf.cli import CommandError
from diffmoe_hf.training import train_class_conditional as script
from diffmoe_hf.training.data import folder_class_ids

from .training_helpers import make_image_folder, save_tiny_pipeline, script_args


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny DSMoE pipeline with 3 classes named class_0, class_1, class_2."""
    return save_tiny_pipeline(str(tmp_path_factory.mktemp("pipe")), "dsmoe")


def train(*args):
    try:
        script.main(script.parse_args(list(args)))
    finally:
        AcceleratorState._reset_state(True)


def _rename(root, renames):
    for old, new in renames.items():
        os.rename(os.path.join(root, old), os.path.join(root, new))


def test_class_folders_map_to_the_models_class_ids(pretrained, tmp_path, monkeypatch, caplog):
    """000/ is class 0, an empty 001/ shifts nothing, class_2/ is class 2 by the model's class names."""
    data = make_image_folder(str(tmp_path / "data"))
    shutil.rmtree(os.path.join(data, "class_1"))
    os.makedirs(os.path.join(data, "001"))  # empty: datasets' imagefolder drops it
    _rename(data, {"class_0": "000"})
    seen = set()
    original = script.diffusion_training_loss

    def recording_loss(formulation, denoiser, x0, class_labels, **kwargs):
        seen.update(class_labels.tolist())
        return original(formulation, denoiser, x0, class_labels, **kwargs)

    monkeypatch.setattr(script, "diffusion_training_loss", recording_loss)
    with caplog.at_level("INFO"):
        train(
            *script_args(
                pretrained, data, str(tmp_path / "out"), "--max_train_steps", "4", "--checkpointing_steps", "10"
            )
        )
    assert seen == {0, 2}
    assert "Class folders of " + data + " -> class ids: 000/ -> 0, class_2/ -> 2" in caplog.text


def test_class_folders_that_match_no_class_are_refused(pretrained, tmp_path):
    data = make_image_folder(str(tmp_path / "data"), per_class=1)
    _rename(data, {"class_0": "207", "class_1": "dog"})
    with pytest.raises(CommandError) as error:
        train(*script_args(pretrained, data, str(tmp_path / "out"), "--max_train_steps", "1"))
    message = str(error.value)
    assert "207/ is class id 207, beyond the model's 3 classes" in message
    assert "dog/ is no class name of the model" in message
    assert "The model has 3 classes (ids 0..2: 0: 'class_0', 1: 'class_1', 2: 'class_2')" in message
    assert "Name each folder by the class id it holds" in message
    assert not os.path.exists(os.path.join(tmp_path, "out", "transformer"))


def test_folder_class_ids_rules():
    imagenet = {"134": "crane", "517": "crane", "1": "goldfish, Carassius auratus", "0": "tench, Tinca tinca"}
    assert folder_class_ids(["0207", "goldfish", "tench, Tinca tinca"], 1000, imagenet) == {
        "0207": 207,
        "goldfish": 1,
        "tench, Tinca tinca": 0,
    }
    with pytest.raises(ValueError, match=r"crane/ names classes \[134, 517\]: name it by its class id"):
        folder_class_ids(["crane"], 1000, imagenet)
    with pytest.raises(ValueError, match=r"1/ and goldfish/ are all class 1"):
        folder_class_ids(["1", "goldfish"], 1000, imagenet)
    with pytest.raises(ValueError, match=r"cat/ is no class name of the model.*ids 0\.\.9, no class names"):
        folder_class_ids(["cat"], 10, None)
    # a model made for the data: digit names are ids (an empty or missing folder shifts nothing), names are sorted
    assert folder_class_ids(["004", "006"]) == {"004": 4, "006": 6}
    assert folder_class_ids(["dog", "cat"]) == {"cat": 0, "dog": 1}
    with pytest.raises(ValueError, match="mix class ids"):
        folder_class_ids(["1", "cat"])


class NetworkUsed(BaseException):
    """Raised by the socket guard (a BaseException, so that no retry loop swallows it)."""


def test_training_without_push_to_hub_never_contacts_the_network(pretrained, tmp_path, monkeypatch):
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # online, as a user's machine is
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise NetworkUsed(f"network contacted: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    data = make_image_folder(str(tmp_path / "data"), per_class=1)
    out = str(tmp_path / "gpt2")  # the model card's repo id is the folder name: here an existing Hub model
    train(*script_args(pretrained, data, out, "--max_train_steps", "1", "--checkpointing_steps", "10"))
    assert attempts == []
    card = open(os.path.join(out, "README.md")).read()
    assert "# gpt2" in card and "DSMoETransformer2DModel" in card and "diffmoe_hf" in card


def test_unreadable_images_are_found_before_training_or_skipped(pretrained, tmp_path, caplog):
    data = make_image_folder(str(tmp_path / "data"), per_class=2)
    with open(os.path.join(data, "class_1", "1.png"), "wb") as f:
        f.write(b"not a png")
    truncated = os.path.join(data, "class_2", "0.png")
    content = open(truncated, "rb").read()
    with open(truncated, "wb") as f:
        f.write(content[: len(content) // 2])
    out = str(tmp_path / "out")
    with pytest.raises(CommandError) as error:  # the broken images would come in later batches: found before step 1
        train(*script_args(pretrained, data, out, "--max_train_steps", "1", "--checkpointing_steps", "1"))
    message = str(error.value)
    assert message.startswith("2 of 6 training images cannot be read: Cannot read image ")
    assert os.path.join("class_1", "1.png") in message and os.path.join("class_2", "0.png") in message
    assert "pass --skip_unreadable_images to train without them" in message
    assert not os.path.exists(os.path.join(out, "checkpoint-1"))

    with caplog.at_level("WARNING"):
        train(
            *script_args(
                pretrained,
                data,
                out,
                "--max_train_steps",
                "2",
                "--checkpointing_steps",
                "10",
                "--skip_unreadable_images",
            )
        )
    assert "2 of 6 training images cannot be read" in caplog.text and "Training without them" in caplog.text
    assert os.path.isfile(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))


def test_a_sharding_engine_accelerate_ignores_is_reported(pretrained, tmp_path, monkeypatch, caplog):
    """An FSDP config launched on CPU processes runs unsharded: the run says so instead of going on silently."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    data = make_image_folder(str(tmp_path / "data"), per_class=1)
    with caplog.at_level("WARNING"):
        train(*script_args(pretrained, data, str(tmp_path / "out"), "--max_train_steps", "1", "--image_check", "none"))
    assert "The accelerate config asks for FSDP but accelerate runs NO (it enables FSDP only on GPUs" in caplog.text


def test_image_check_modes(tmp_path):
    """'decode' reads every pixel; 'verify' checks the file's structure (it finds a file that is no image, and a PNG
    cut short, whose chunks end early)."""
    from datasets import Dataset

    from diffmoe_hf.training.data import find_unreadable_images

    data = make_image_folder(str(tmp_path / "data"), num_classes=1, per_class=3)
    paths = [os.path.join(data, "class_0", f"{j}.png") for j in range(3)]
    with open(paths[1], "wb") as f:
        f.write(b"not a png")
    content = open(paths[2], "rb").read()
    with open(paths[2], "wb") as f:
        f.write(content[: len(content) // 2])
    dataset = Dataset.from_dict({"image": [{"bytes": None, "path": p} for p in paths]})
    for decode in (True, False):
        bad = find_unreadable_images(dataset, "image", decode=decode)
        assert [row for row, _ in bad] == [1, 2], decode
        assert all(message.startswith(f"Cannot read image {paths[row]}: ") for row, message in bad)
    # two shards (two processes) find the same images between them
    shards = [find_unreadable_images(dataset, "image", num_shards=2, shard_index=i) for i in (0, 1)]
    assert [row for shard in shards for row, _ in shard] == [1, 2]
