"""`--expert_parallel_size` in train_class_conditional.py and `diffmoe sample --expert-parallel-size`, in 2 CPU
processes on gloo (one launch of tests/expert_parallel_training_worker.py, several runs): 5 steps at K = 2 end within
the float32 bound of K = 1, resuming at K = 2 is exact, checkpoints load at another K (2 -> 1, 1 -> 2) and continue,
a checkpoint without resharding support is refused, the export is an ordinary diffusers folder loaded on one
process, LoRA on experts, EMA and bf16 mixed precision train expert-parallel and resume exactly, and sampling at K = 2
writes the file of a run without expert parallelism."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from .helpers import assert_float32_close, model_float32_tolerance
from .training_helpers import make_image_folder, save_tiny_pipeline, tiny_transformer


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5


def launch(processes: int, plan: str, *arguments: str) -> str:
    """Runs the worker's `plan` in `processes` processes; returns their stderr."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launcher, "-m", "tests.expert_parallel_training_worker", plan, *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    return result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("expert-parallel-training")
    pretrained = save_tiny_pipeline(str(folder / "pipe"), "dit-moe")
    images = make_image_folder(str(folder / "images"))
    dynamic_token = save_tiny_pipeline(str(folder / "dynamic-token-pipe"), "dynamic-token-moe")
    stderr = launch(2, "two", pretrained, images, str(folder / "runs"), dynamic_token)
    (folder / "runs" / "stderr.txt").write_text(stderr)
    return folder / "runs"


def exported(runs, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(runs / name / "transformer" / "diffusion_pytorch_model.safetensors"))


def initial_weights(runs) -> dict[str, torch.Tensor]:
    return load_file(str(runs.parent / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_expert_parallel_training_matches_k1_resumes_exactly_and_reshards(runs):
    k1, k2 = exported(runs, "ep1"), exported(runs, "ep2")
    pipe = DiffusionPipeline.from_pretrained(str(runs / "ep2"))  # an ordinary folder, loaded by one process
    model = pipe.transformer
    assert k2.keys() == k1.keys() == set(model.state_dict())
    assert sum(".experts." in name for name in k2) == 2 * 4 * 3  # every expert of both layers was exported
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, k2[name]), name
    # every step's forward and backward (gradient accumulation 2, recomputed blocks) adds its rounding
    tolerance = model_float32_tolerance(model, k1["proj_out.proj.weight"], calls=2 * 2 * 2 * STEPS)
    for name in k1:
        assert_float32_close(k2[name], k1[name], tolerance, f"K=2 vs K=1: {name}")
    resumed = exported(runs, "ep2-resumed")
    for name in k2:
        assert torch.equal(resumed[name], k2[name]), name
    for name, expected in (("ep1-from-ep2", k2), ("ep2-from-ep1", k1)):
        loaded = exported(runs, name)
        for key in expected:
            assert_float32_close(loaded[key], expected[key], tolerance, f"{name}: {key}")
    initial = initial_weights(runs)
    assert not torch.equal(
        k2["transformer_blocks.0.ff.experts.3.up_proj.weight"],
        initial["transformer_blocks.0.ff.experts.3.up_proj.weight"],
    )
    assert os.path.isdir(runs / "ep2" / "checkpoint-3" / "expert_parallel")
    refused = json.loads((runs / "refused.json").read_text())
    assert "was not saved with --expert_parallel_size, so it cannot be resharded" in refused["ep2-from-ddp"]
    assert refused["three-experts"] == (
        "--expert_parallel_size: expert_parallel_size=2 must divide the expert count of every MoE layer; "
        "transformer_blocks.0.ff.experts has 3 experts."
    )
    assert not (runs / "three-experts").exists()
    assert refused["sample-dense"] == 2
    message = "diffmoe sample: error: expert_parallel_size=2 needs a model with MoE layers; JiTTransformer2DModel"
    assert message in (runs / "stderr.txt").read_text()


def step_tolerance(runs, reference: torch.Tensor) -> float:
    """
    The float32 bound of the test above: every step's forward and backward (accumulation 2, recomputed blocks).

    AdamW moves a weight by about the learning rate whatever its gradient's size, so after 5 steps this bound on the
    weights is about as large as their change: it catches a run that diverges or loses or mixes up weights, while the
    gradients themselves are compared with the single-process model, where a 0.1% error fails, in
    tests/test_expert_parallel.py. The exact checks here (bit-identical resumes, the EMA export not being the last
    weights) do not depend on it.
    """
    model = DiffusionPipeline.from_pretrained(str(runs.parent / "pipe")).transformer
    return model_float32_tolerance(model, reference, calls=2 * 2 * 2 * STEPS)


def test_lora_on_experts_trains_expert_parallel_resumes_exactly_and_loads_on_the_base_pipeline(runs):
    def adapter(name: str) -> dict[str, torch.Tensor]:
        return load_file(str(runs / name / "pytorch_lora_weights.safetensors"))

    k1, k2 = adapter("lora1"), adapter("lora2-from-lora1")  # steps 4 and 5 at K = 1 and at K = 2
    assert k2.keys() == k1.keys()
    assert sum(".experts." in name for name in k2) == 2 * 4 * 3 * 2  # A and B of every expert's 3 projections
    tolerance = step_tolerance(runs, k1["transformer.transformer_blocks.0.ff.experts.0.up_proj.lora_B.weight"])
    for name in k1:
        assert_float32_close(k2[name], k1[name], tolerance, f"LoRA K=2 vs K=1: {name}")
    resumed = adapter("lora2-resumed")
    for name in k2:
        assert torch.equal(resumed[name], k2[name]), name
    fresh = adapter("lora2-fresh")  # after one step: the A matrices as drawn (B starts at 0, so A's gradient is 0)
    for projection in ("gate_proj", "up_proj", "down_proj"):
        first, twin = (f"transformer.transformer_blocks.0.ff.experts.{e}.{projection}.lora_A.weight" for e in (0, 2))
        assert not torch.equal(fresh[first], fresh[twin]), "rank 1's new adapter on expert 2 copies expert 0's"
    pipe = DiffusionPipeline.from_pretrained(str(runs.parent / "pipe"))
    pipe.load_lora_weights(str(runs / "lora2-from-lora1"))
    (adapter_name,) = pipe.transformer.peft_config
    name = "transformer_blocks.1.ff.experts.3.down_proj.lora_B"
    loaded = pipe.transformer.state_dict()[f"{name}.{adapter_name}.weight"]
    assert torch.equal(loaded, k2[f"transformer.{name}.weight"])


def test_ema_under_expert_parallelism_exports_the_average_of_a_run_without_it_and_resumes_exactly(runs):
    ddp, k1, k2 = exported(runs, "ema-ddp"), exported(runs, "ema1"), exported(runs, "ema2-from-ema1")
    tolerance = step_tolerance(runs, k1["proj_out.proj.weight"])
    for name in ddp:
        assert_float32_close(k1[name], ddp[name], tolerance, f"EMA K=1 vs no expert parallelism: {name}")
        assert_float32_close(k2[name], k1[name], tolerance, f"EMA K=2 vs K=1: {name}")
    resumed = exported(runs, "ema2-resumed")
    for name in k2:
        assert torch.equal(resumed[name], k2[name]), name
    # the same training without EMA (same seeds, same K: the same weights bit for bit) ends with other weights
    last, initial = exported(runs, "ep2-from-ep1"), initial_weights(runs)
    for name in k2:
        if not torch.equal(last[name], initial[name]):
            assert not torch.equal(k2[name], last[name]), f"{name}: exported the last weights, not their average"


def test_fsdp2_on_the_non_expert_weights_shards_them_trains_as_ddp_and_reshards(runs):
    ddp, sharded = exported(runs, "ep2"), exported(runs, "fsdp2")
    tolerance = step_tolerance(runs, ddp["proj_out.proj.weight"])
    resumed, to_k1 = exported(runs, "fsdp2-resumed"), exported(runs, "ep1-from-fsdp2")
    for name in ddp:
        assert_float32_close(sharded[name], ddp[name], tolerance, f"FSDP2 vs DDP on the rest: {name}")
        assert torch.equal(resumed[name], sharded[name]), name
        assert_float32_close(to_k1[name], ddp[name], tolerance, f"FSDP2 K=2 -> DDP K=1: {name}")
    lora = load_file(str(runs / "lora1" / "pytorch_lora_weights.safetensors"))
    lora_sharded = load_file(str(runs / "lora2-fsdp2-from-lora1" / "pytorch_lora_weights.safetensors"))
    ema, ema_sharded = exported(runs, "ema1"), exported(runs, "ema2-fsdp2-from-ema1")
    for expected, actual, label in ((lora, lora_sharded, "LoRA"), (ema, ema_sharded, "EMA")):
        assert actual.keys() == expected.keys()
        for name in expected:
            assert_float32_close(actual[name], expected[name], tolerance, f"{label} with FSDP2: {name}")
    # a non-expert weight is saved by both ranks, one shard each; an expert whole by the rank holding it
    checkpoint = runs / "fsdp2" / "checkpoint-3" / "expert_parallel"
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    assert len(metadata["model.transformer_blocks.0.attn.to_q.weight"].chunks) == 2
    assert len(metadata["model.transformer_blocks.0.ff.experts.3.up_proj.weight"].chunks) == 1
    ddp_metadata = dcp.FileSystemReader(str(runs / "ep2" / "checkpoint-3" / "expert_parallel")).read_metadata()
    assert len(ddp_metadata.state_dict_metadata["model.transformer_blocks.0.attn.to_q.weight"].chunks) == 1


def test_bf16_mixed_precision_trains_expert_parallel_and_resumes_exactly(runs):
    trained, resumed = exported(runs, "bf16-2"), exported(runs, "bf16-2-resumed")
    initial = initial_weights(runs)
    for name in trained:
        assert trained[name].dtype == torch.float32 and torch.isfinite(trained[name]).all(), name
        assert torch.equal(resumed[name], trained[name]), name
    expert = "transformer_blocks.0.ff.experts.3.up_proj.weight"
    assert not torch.equal(trained[expert], initial[expert])


def test_four_processes_resume_bit_exactly_and_reshard_to_four_expert_ranks(tmp_path):
    """A 2 x 2 mesh: DDP's all-reduces over 4 ranks must add in the same order before and after a resume; so must a
    run without expert parallelism whose idle experts DDP reduces too (a DSMoE router collapsed onto 2 experts)."""
    pretrained = save_tiny_pipeline(str(tmp_path / "pipe"), "dit-moe")
    collapsed = tiny_transformer("dsmoe")
    with torch.no_grad():  # every token of block 1 prefers experts 2 and 3: experts 0 and 1 get no tokens
        collapsed.transformer_blocks[1].ff.router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 10, 20]))
    dsmoe = save_tiny_pipeline(str(tmp_path / "dsmoe"), "dsmoe", collapsed)
    launch(4, "four", pretrained, make_image_folder(str(tmp_path / "images")), str(tmp_path / "runs"), dsmoe)
    runs = tmp_path / "runs"
    straight, resumed, resharded = (exported(runs, name) for name in ("ep2", "ep2-resumed", "ep4-from-ep2"))
    model = DiffusionPipeline.from_pretrained(str(runs / "ep4-from-ep2")).transformer
    tolerance = model_float32_tolerance(model, straight["proj_out.proj.weight"], calls=2 * 2 * 2 * STEPS)
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
        assert_float32_close(resharded[name], straight[name], tolerance, f"K=2 -> 4: {name}")
    straight, resumed = exported(runs, "ddp"), exported(runs, "ddp-resumed")
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), f"DDP, 4 processes: {name}"


@pytest.mark.parametrize("family", ["dit-moe", "dynamic-token-moe"])
def test_expert_parallel_sampling_writes_the_file_of_one_copy_of_the_experts(runs, family):
    expected, actual = np.load(runs / f"{family}.npz"), np.load(runs / f"{family}-ep2.npz")
    assert np.array_equal(actual["arr_1"], expected["arr_1"])
    folder = runs / "ep2" if family == "dit-moe" else runs.parent / "dynamic-token-pipe"
    model = DiffusionPipeline.from_pretrained(str(folder)).transformer
    reference = torch.from_numpy(expected["arr_float"])
    tolerance = model_float32_tolerance(model, reference, calls=2 * 2 * 2)  # 2 steps, guided, and the VAE's decoder
    assert_float32_close(torch.from_numpy(actual["arr_float"]), reference, tolerance, family)
    grey_levels = np.abs(actual["arr_0"].astype(int) - expected["arr_0"].astype(int))
    assert grey_levels.max() <= 1  # a value on a rounding boundary may round the other way
