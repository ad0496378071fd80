"""A quiet console: the package prints nothing of its own on import or `--help`, and no extra installs a library
that diffusers imports at startup and a CPU machine cannot load (torchao: five warning lines on every command)."""

import os
import runpy
import subprocess
import sys
from unittest import mock

from .conftest import REPO_ROOT


# `diffmoe --help` with torchao unimportable, as after `pip install -e ".[dev]"`: diffusers checks availability with
# `importlib.util.find_spec`
HELP_WITHOUT_TORCHAO = """
import importlib.util, sys

find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] == "torchao" else find_spec(name, package)
sys.modules["torchao"] = None
from diffmoe_hf.cli import main

main(["--help"])
"""


def test_help_prints_nothing_on_stderr():
    result = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TORCHAO], capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert result.returncode == 0 and "usage: diffmoe" in result.stdout
    assert result.stderr == ""


def _extras() -> dict[str, list[str]]:
    captured = {}
    with mock.patch("setuptools.setup", lambda **arguments: captured.update(arguments)):
        runpy.run_path(os.path.join(REPO_ROOT, "setup.py"))
    return captured["extras_require"]


def test_no_extra_installs_torchao():
    assert not [(extra, dep) for extra, deps in _extras().items() for dep in deps if dep.startswith("torchao")]
