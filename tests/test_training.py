"""training/train_class_conditional.py and training/extract_features.py on tiny models and generated data (CPU,
no network): every family trains, LoRA output reloads with `load_lora_weights`, resume is exact, bad data is named,
two DDP processes end with identical weights."""

import json
import os

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

from diffmoe_hf import ClassConditionalMoEPipeline
from diffmoe_hf.cli import CommandError
from diffmoe_hf.training import extract_features
from diffmoe_hf.training.train_class_conditional import main, parse_args

from .conftest import REPO_ROOT
from .helpers import registered_families
from .training_helpers import (
    NUM_CLASSES,
    make_image_folder,
    run_two_processes,
    save_tiny_pipeline,
    script_args,
    tiny_transformer,
    train,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No network (the subprocesses get HF_HUB_OFFLINE)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("images")))


def _png(path):
    return np.asarray(Image.open(path)).astype(int)


@pytest.mark.parametrize("family", registered_families())
def test_lora_training_reloads_with_load_lora_weights(family, images, tmp_path):
    pretrained = save_tiny_pipeline(str(tmp_path / "pipe"), family)
    out = str(tmp_path / "lora")
    train(
        pretrained,
        images,
        out,
        "--use_lora",
        "--rank",
        "4",
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "5",
        "--validation_epochs",
        "1",
        "--validation_class_labels",
        "0,2",
        family=family,
    )
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert "lora" in open(os.path.join(out, "README.md")).read()
    state = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("transformer.transformer_blocks.") for k in state)
    assert not any(".router" in k or "capacity_predictor" in k for k in state)
    assert any(".experts." in k for k in state) and any(".attn.to_q." in k for k in state)
    # the adapter was trained: lora_B moved away from its zero init
    assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)

    # a fresh pipeline with the saved adapter reproduces the images the trained model made at the end of training
    pipe = ClassConditionalMoEPipeline.from_pretrained(pretrained)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out)
    generated = pipe([0, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    for i, (image, label) in enumerate(zip(generated, [0, 2])):
        saved = _png(os.path.join(out, "validation", "final", f"{i:03d}-class{label}.png"))
        assert np.array_equal(np.asarray(image).astype(int), saved)


def _transformer_state(folder):
    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


def test_resume_continues_exactly(images, tmp_path):
    """n steps in one run == k steps, then --resume_from_checkpoint latest for the remaining n - k (mid-epoch, with
    EMA, gradient accumulation, random flips, label dropout, DiffMoE thresholds and the checkpoint limit)."""
    pretrained = save_tiny_pipeline(str(tmp_path / "pipe"), "diffmoe-dts")
    common = [
        "--use_ema",
        "--random_flip",
        "--gradient_accumulation_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--learning_rate",
        "1e-3",
    ]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    train(pretrained, images, full, *common, "--max_train_steps", "4", "--checkpoints_total_limit", "1")
    assert sorted(d for d in os.listdir(full) if d.startswith("checkpoint-")) == ["checkpoint-4"]
    train(pretrained, images, resumed, *common, "--max_train_steps", "2")  # 3 steps per epoch: stops mid-epoch
    train(pretrained, images, resumed, *common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")

    for name in ("checkpoint-4/transformer", "checkpoint-4/transformer_ema", "transformer"):
        a = load_file(os.path.join(full, name, "diffusion_pytorch_model.safetensors"))
        b = load_file(os.path.join(resumed, name, "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    initial = _transformer_state(pretrained)
    final = load_file(os.path.join(full, "checkpoint-4", "transformer", "diffusion_pytorch_model.safetensors"))
    threshold = "transformer_blocks.1.ff.capacity_predictor.expert_threshold"
    assert not torch.equal(initial[threshold], final[threshold])  # the capacity thresholds were calibrated
    assert not torch.equal(initial["proj_out.proj.weight"], final["proj_out.proj.weight"])
    ema = _transformer_state(full)  # the saved pipeline holds the EMA weights
    assert not torch.equal(ema["proj_out.proj.weight"], final["proj_out.proj.weight"])


def test_lora_resume_continues_exactly(images, tmp_path):
    pretrained = save_tiny_pipeline(str(tmp_path / "pipe"), "dsmoe")
    common = ["--use_lora", "--rank", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-2"]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    train(pretrained, images, full, *common, "--max_train_steps", "3")
    train(pretrained, images, resumed, *common, "--max_train_steps", "2")
    train(pretrained, images, resumed, *common, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    a = load_file(os.path.join(full, "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(resumed, "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_training_from_preset_in_pixel_space(tmp_path):
    """Fresh weights from a preset (num_classes from the data), pixel space without a VAE for 1-channel images."""
    data = make_image_folder(str(tmp_path / "gray"), num_classes=2, mode="L")
    tiny = {
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "in_channels": 1,
        "patch_size": 4,
        "bottleneck_dim": 4,
        "in_context_len": 0,
        "moe_layers": [1],
        "num_experts": 4,
        "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 8,
    }
    out = str(tmp_path / "out")
    args = [
        "--preset",
        "JiT-B/16",
        "--model_family",
        "jit",
        "--model_config_overrides",
        json.dumps(tiny),
        "--train_data_dir",
        data,
        "--resolution",
        "16",
        "--output_dir",
        out,
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "2",
        "--report_to",
        "none",
        "--seed",
        "0",
        "--validation_epochs",
        "1",
        "--validation_inference_steps",
        "2",
        "--checkpointing_steps",
        "10",
    ]
    try:
        main(parse_args(args))
    finally:
        AcceleratorState._reset_state(True)
    pipe = ClassConditionalMoEPipeline.from_pretrained(out)
    assert pipe.vae is None and pipe.transformer.config.num_classes == 2
    assert pipe.transformer.config.sample_size == 16 and pipe.config.id2label == {"0": "class_0", "1": "class_1"}
    assert len(os.listdir(os.path.join(out, "validation", "final"))) == 2


def test_feature_extraction_resumes_and_latents_train(images, tmp_path):
    pretrained = save_tiny_pipeline(str(tmp_path / "pipe"), "dsmoe")
    latents = str(tmp_path / "latents")
    extract_args = [
        "--train_data_dir",
        images,
        "--vae_name_or_path",
        pretrained,
        "--vae_subfolder",
        "vae",
        "--resolution",
        "8",
        "--batch_size",
        "3",
        "--shard_size",
        "5",
        "--output_dir",
        latents,
    ]
    extract_features.main(extract_features.parse_args(extract_args))
    AcceleratorState._reset_state(True)
    metadata = json.load(open(os.path.join(latents, "metadata.json")))
    assert metadata["complete"] and metadata["num_shards"] == 3 and metadata["num_samples"] == 12
    first = load_file(os.path.join(latents, "latents-00001.safetensors"))
    assert first["latents"].shape == (5, 4, 8, 8) and first["labels"].dtype == torch.int64

    # an interrupted run: one shard missing, metadata incomplete -> the rerun only writes that shard, identically
    os.remove(os.path.join(latents, "latents-00001.safetensors"))
    mtime = os.path.getmtime(os.path.join(latents, "latents-00000.safetensors"))
    extract_features.main(extract_features.parse_args(extract_args))
    AcceleratorState._reset_state(True)
    assert os.path.getmtime(os.path.join(latents, "latents-00000.safetensors")) == mtime
    again = load_file(os.path.join(latents, "latents-00001.safetensors"))
    assert torch.equal(first["latents"], again["latents"]) and torch.equal(first["labels"], again["labels"])

    out = str(tmp_path / "out")
    args = [
        "--pretrained_model_name_or_path",
        pretrained,
        "--train_latents_dir",
        latents,
        "--output_dir",
        out,
        "--train_batch_size",
        "4",
        "--max_train_steps",
        "2",
        "--report_to",
        "none",
        "--validation_epochs",
        "0",
        "--checkpointing_steps",
        "10",
    ]
    try:
        main(parse_args(args))
    finally:
        AcceleratorState._reset_state(True)
    assert os.path.isfile(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))


def test_bad_data_is_named(images, tmp_path):
    pretrained = save_tiny_pipeline(str(tmp_path / "pipe"), "dsmoe", tiny_transformer("dsmoe"))
    # a class folder more than the model has classes
    data = make_image_folder(str(tmp_path / "four"), num_classes=NUM_CLASSES + 1, per_class=1)
    with pytest.raises(CommandError, match=r"class_3/ is no class name of the model"):
        train(pretrained, data, str(tmp_path / "out"), "--max_train_steps", "1")
    # an unreadable image
    data = make_image_folder(str(tmp_path / "broken"), per_class=2)
    with open(os.path.join(data, "class_1", "1.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(CommandError, match=r"Cannot read image .*class_1.1\.png"):
        train(pretrained, data, str(tmp_path / "out"), "--max_train_steps", "6", "--checkpointing_steps", "10")
    # latents of another shape than the model's
    latents = tmp_path / "latents"
    latents.mkdir()
    from diffmoe_hf.training.data import write_latent_shard

    write_latent_shard(str(latents), 0, torch.zeros(2, 4, 16, 16), torch.zeros(2, dtype=torch.long))
    (latents / "metadata.json").write_text(json.dumps({"num_shards": 1, "complete": True, "scaling_factor": 0.18215}))
    with pytest.raises(CommandError, match=r"latents-00000.safetensors holds latents of shape \(4, 16, 16\)"):
        main(
            parse_args(
                [
                    "--pretrained_model_name_or_path",
                    pretrained,
                    "--train_latents_dir",
                    str(latents),
                    "--output_dir",
                    str(tmp_path / "o"),
                    "--report_to",
                    "none",
                ]
            )
        )
    AcceleratorState._reset_state(True)
    with pytest.raises(CommandError, match="Routers are never LoRA-adapted"):
        parse_args(["--preset", "x", "--model_family", "dsmoe", "--train_data_dir", ".", "--lora_layers", "router"])


@pytest.mark.parametrize("family", ["dsmoe", "diffmoe-dts"])
def test_two_ddp_processes_end_with_identical_weights(family, images, tmp_path):
    """torchrun, 2 CPU processes: DDP keeps the ranks in sync although a collapsed router leaves experts idle (DSMoE)
    and DiffMoE's capacity predictor learns only through its side loss (with EMA and gradient checkpointing). For
    DiffMoE, 2 steps + resume from that checkpoint + 2 steps end exactly where 4 straight steps end."""
    transformer = tiny_transformer(family)
    extra = ["--use_ema", "--gradient_checkpointing", "--random_flip"] if family == "diffmoe-dts" else []
    if family == "dsmoe":
        with torch.no_grad():  # every token of block 1 prefers experts 2 and 3: experts 0 and 1 get no tokens
            bias = transformer.transformer_blocks[1].ff.router.e_score_correction_bias
            bias.copy_(torch.tensor([0.0, 0.0, 10, 20]))
    pretrained = save_tiny_pipeline(str(tmp_path / "pipe"), family, transformer)
    out = str(tmp_path / "ddp")
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3", *extra]
    run_two_processes(script_args(pretrained, images, out, *common))
    rank0, rank1 = (load_file(os.path.join(out, f"rank{r}.safetensors")) for r in (0, 1))
    initial = _transformer_state(pretrained)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert not torch.equal(rank0["proj_out.proj.weight"], initial["proj_out.proj.weight"])
    if family == "dsmoe":  # idle experts: zero gradient, no update (AdamW without weight decay)
        idle = "transformer_blocks.1.ff.experts.0.up_proj.weight"
        assert torch.equal(rank0[idle], initial[idle])
        return
    # the capacity predictor learned and its thresholds were averaged over the ranks
    predictor = "transformer_blocks.1.ff.capacity_predictor.linear_1.weight"
    assert not torch.equal(rank0[predictor], initial[predictor])

    # exact resume with 2 processes (each restores its own random state; 3 batches per process per epoch: mid-epoch)
    resumed = str(tmp_path / "resumed")
    run_two_processes(
        script_args(
            pretrained, images, resumed, *common, "--resume_from_checkpoint", os.path.join(out, "checkpoint-2")
        )
    )
    for name in ("rank0.safetensors", "rank1.safetensors", "transformer/diffusion_pytorch_model.safetensors"):
        a, b = load_file(os.path.join(out, name)), load_file(os.path.join(resumed, name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_accelerate_configs_wrap_each_familys_block():
    from accelerate.commands.config.config_args import load_config_from_file

    import diffmoe_hf

    folder = os.path.join(REPO_ROOT, "training", "configs")
    wrap = {}
    for name in sorted(os.listdir(folder)):
        config = load_config_from_file(os.path.join(folder, name))
        if config.distributed_type == "FSDP":
            wrap[name] = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
        elif config.distributed_type == "DEEPSPEED":
            assert config.deepspeed_config["zero_stage"] == int(name[-6])
    assert {"ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"} <= set(os.listdir(folder))
    blocks = {
        cls._no_split_modules[0]
        for cls in (getattr(diffmoe_hf, n) for n in dir(diffmoe_hf))
        if hasattr(cls, "_no_split_modules") and cls.__module__.startswith("diffmoe_hf")
    }
    assert set(wrap.values()) == blocks == {"AdaLNZeroTransformerBlock", "SpatialTemporalMoEBlock"}


@pytest.mark.parametrize(
    "config, checkpoint_files",
    [
        ("fsdp.yaml", {"pytorch_model_fsdp_0", "optimizer_0"}),
        ("deepspeed_zero2.yaml", {"pytorch_model", "latest"}),
        ("deepspeed_zero3.yaml", {"pytorch_model", "latest"}),
    ],
)
def test_sharded_engines_on_two_cpu_processes_train_and_resume_exactly(config, checkpoint_files, images, tmp_path):
    """A shipped FSDP2 / DeepSpeed config on 2 CPU processes (gloo; see tests/sharded_cpu_training_worker.py): sharded
    checkpoints with every rank's RNG state, 4 straight steps == 2 steps + resume + 2 steps, the gathered pipeline
    is trained."""
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")  # not a dependency of diffmoe_hf
    pretrained = save_tiny_pipeline(str(tmp_path / "pipe"), "dsmoe")
    config = os.path.join(REPO_ROOT, "training", "configs", config)
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--random_flip"]
    output = run_two_processes(script_args(pretrained, images, full, *common), accelerate_config=config)
    engine = "FSDP" if "fsdp" in config else "DEEPSPEED"
    assert f"Distributed environment: DistributedType.{engine}" in output
    saved = set(os.listdir(os.path.join(full, "checkpoint-2")))
    assert checkpoint_files | {"random_states_0.pkl", "random_states_1.pkl"} <= saved, saved
    run_two_processes(
        script_args(
            pretrained, images, resumed, *common, "--resume_from_checkpoint", os.path.join(full, "checkpoint-2")
        ),
        accelerate_config=config,
    )
    a, b, initial = _transformer_state(full), _transformer_state(resumed), _transformer_state(pretrained)
    assert a.keys() == b.keys() == initial.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["proj_out.proj.weight"], initial["proj_out.proj.weight"])
