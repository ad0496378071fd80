"""Expert parallelism (`diffmoe_hf.parallel`): banks that build only their block of experts under global names, the
checks of the expert-parallel size, and, in 2 and 4 CPU processes on gloo (tests/expert_parallel_worker.py), every
family's outputs, routing, statistics, auxiliary loss and gradients against the single-process model."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from diffmoe_hf import cli
from diffmoe_hf.families import get_family
from diffmoe_hf.models.moe import holding_experts
from diffmoe_hf.parallel import check_expert_parallel_size, expert_parallel_mesh

from .helpers import expert_banks, registered_families, tiny_model, tiny_pipeline


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_bank_built_for_an_expert_rank_holds_only_its_experts_under_their_global_names():
    full = tiny_model("dit-moe")
    with holding_experts(1, 2):
        local = get_family("dit-moe").tiny_model()
    for bank in expert_banks(local):
        assert list(bank.expert_ids) == [2, 3] and len(bank) == 2 and bank.num_experts == 4
    local_names, full_names = set(local.state_dict()), set(full.state_dict())
    assert local_names < full_names
    assert full_names - local_names == {name for name in full_names if ".experts.0." in name or ".experts.1." in name}


def test_a_rank_loads_its_experts_from_a_full_folder_without_warning_about_the_others(tmp_path):
    full = tiny_model("dit-moe")
    full.save_pretrained(tmp_path)
    records, handler = [], logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")  # diffusers' loggers do not propagate to the root logger
    diffusers_logger.addHandler(handler)
    try:
        with holding_experts(1, 2):
            local = type(full).from_pretrained(tmp_path)
    finally:
        diffusers_logger.removeHandler(handler)
    assert not [record.getMessage() for record in records if "were not used" in record.getMessage()]
    for name, tensor in local.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[name]), name
    assert type(full)._keys_to_ignore_on_load_unexpected is None  # elsewhere every unused weight is reported


@pytest.mark.parametrize("family", registered_families())
def test_fresh_experts_of_different_expert_ranks_are_different_draws(family):
    """Every rank builds from the same seed: without a stream of their own, rank 1's experts would copy rank 0's."""
    if not expert_banks(tiny_model(family)):
        pytest.skip("no MoE layer")

    def build(rank: int):
        torch.manual_seed(0)
        with holding_experts(rank, 2):
            return get_family(family).tiny_model().state_dict()

    first, second = build(0), build(1)
    half = expert_banks(tiny_model(family))[0].num_experts // 2
    copied = 0
    for name, tensor in first.items():
        if ".experts." not in name:
            assert torch.equal(second[name], tensor), f"{family}: {name} differs between ranks"
            continue
        expert = int(name.split(".experts.")[1].split(".")[0])
        twin = name.replace(f".experts.{expert}.", f".experts.{expert + half}.", 1)
        random = tensor.unique().numel() > 1  # not a constant init (zero biases, unit gains)
        copied += random and torch.equal(second[twin], tensor)
    assert copied == 0, f"{family}: {copied} expert tensors of rank 1 copy rank 0's"


def test_the_expert_parallel_size_must_divide_every_expert_count_of_a_moe_model():
    with pytest.raises(ValueError, match=r"expert_parallel_size=3 must divide the expert count of every MoE layer; "):
        check_expert_parallel_size(tiny_model("dsmoe"), 3)
    with pytest.raises(
        ValueError, match=r"expert_parallel_size=2 needs a model with MoE layers; JiTTransformer2DModel"
    ):
        check_expert_parallel_size(tiny_model("jit", "dense"), 2)
    with pytest.raises(ValueError, match="3 experts cannot be split over an expert-parallel size of 2"):
        with holding_experts(0, 2):
            get_family("dsmoe").tiny_model(num_experts=3, n_group=1, topk_group=1)
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        expert_parallel_mesh(2)


def test_a_backend_without_all_to_all_is_named_when_the_mesh_is_made(monkeypatch):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert expert_parallel_mesh(1).expert_size == 1  # gloo runs the exchange

        def unsupported(*args, **kwargs):
            raise RuntimeError("ProcessGroupGloo does not support alltoall")

        monkeypatch.setattr(dist, "all_to_all_single", unsupported)
        with pytest.raises(ValueError, match=r"all_to_all_single, which the 'gloo' backend of torch \S+ does not run"):
            expert_parallel_mesh(1)
    finally:
        dist.destroy_process_group()


def test_sampling_refuses_an_expert_parallel_size_that_does_not_divide_the_processes(tmp_path, capsys):
    folder = str(tmp_path / "pipe")
    tiny_pipeline(with_vae=False).save_pretrained(folder)
    output = str(tmp_path / "samples.npz")
    assert cli.main(["sample", "--model", folder, "--output", output, "--expert-parallel-size", "2"]) == 2
    message = "diffmoe sample: error: --expert-parallel-size 2 must divide the number of processes (1); launch a "
    assert message in capsys.readouterr().err
    assert cli.main(["sample", "--model", folder, "--output", output, "--expert-parallel-size", "0"]) == 2
    assert "--expert-parallel-size must be at least 1, got 0." in capsys.readouterr().err


def test_expert_parallel_matches_one_process_for_every_family(tmp_path):
    """One launch of 4 processes: K = 2 (a 2 x 2 mesh: 2 groups of 2 ranks, each expert with 2 replicas whose gradients
    are summed) and K = 4 (one expert group, one expert per rank), which loads K = 2's checkpoint (and so does K = 1:
    a single-process model)."""
    processes, sizes = 4, [2, 4]
    report = tmp_path / "report.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launcher, "-m", "tests.expert_parallel_worker", str(report), *map(str, sizes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    checks = json.loads(report.read_text())["checks"]
    assert [(check["family"], check["expert_parallel_size"]) for check in checks] == [
        (family, size) for size in sizes for family in registered_families()
    ]
    for check in checks:
        assert check["experts_held"] * check["expert_parallel_size"] == check["experts_per_layer"]
        assert check["modules_fallback"] == (check["family"] == "spatial-temporal-moe")
    assert checks[-1]["loaded_checkpoint_of_size"] == 2
