"""The `diffmoe` command (run in-process; one subprocess checks the module entry point)."""

import os
import subprocess
import sys

from PIL import Image

from diffmoe_hf.cli import main

from .helpers import dsmoe_case, tiny_vae


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "diffmoe_hf", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "convert" in result.stdout and "generate" in result.stdout


def test_convert_then_generate(tmp_path, capsys):
    case = dsmoe_case()
    tiny_vae().save_pretrained(tmp_path / "vae")
    assert main(["convert", "dsmoe", "--checkpoint", os.path.join(case, "checkpoint.pt"), "--config",
                 os.path.join(case, "config.yaml"), "--output", str(tmp_path / "m")]) == 0  # fmt: skip
    grid = tmp_path / "grid.png"
    assert main(["generate", "--model", str(tmp_path / "m"), "--steps", "1", "--output", str(grid)]) == 2
    assert "no VAE" in capsys.readouterr().err and not grid.exists()
    assert main(["generate", "--model", str(tmp_path / "m"), "--vae", str(tmp_path / "vae"), "--classes", "1", "7",
                 "--per-class", "3", "--steps", "2", "--output", str(grid)]) == 0  # fmt: skip
    assert Image.open(grid).size == (3 * 8, 2 * 8) and str(grid) in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "m"), "--vae", str(tmp_path / "vae"), "--steps", "1",
                 "--output", str(grid)]) == 2  # fmt: skip
    assert "--overwrite" in capsys.readouterr().err


def test_errors_are_reported_without_traceback(tmp_path, capsys):
    assert main(["convert", "dsmoe", "--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_family_options_are_checked(tmp_path, capsys):
    case = dsmoe_case()
    assert main(["convert", "dsmoe", "--checkpoint", os.path.join(case, "checkpoint.pt"), "--config",
                 os.path.join(case, "config.yaml"), "--num-experts", "8", "--output", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "does not take num_experts" in capsys.readouterr().err and not (tmp_path / "o").exists()
