"""Packaging: a core install (`pip install -e .`, no extras) imports the package and runs `diffmoe generate`.

CI also checks this in a fresh virtual environment (`.ci/run`); here the extras are hidden from a subprocess of the
dev environment, so a regression shows in the normal test run.
"""

import os
import subprocess
import sys


# `diffmoe generate` with the packages of the extras ([train], [space], [eval], [dev]; transformers comes with peft)
# made unimportable, both for `import` and for the availability checks diffusers makes with `importlib.util.find_spec`
WITHOUT_EXTRAS = """
import importlib.util, sys

HIDDEN = {"transformers", "peft", "datasets", "gradio", "sklearn", "scipy", "playwright", "pytest", "xdist"}
find_spec = importlib.util.find_spec


class HiddenExtras:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] in HIDDEN else find_spec(name, package)
sys.meta_path.insert(0, HiddenExtras())
from diffmoe_hf.cli import main

status = main(sys.argv[1:])
assert not HIDDEN & set(sys.modules), HIDDEN & set(sys.modules)
sys.exit(status)
"""


def test_core_install_runs_generate(tmp_path):
    grid = tmp_path / "grid.png"
    command = [sys.executable, "-c", WITHOUT_EXTRAS, "generate", "--steps", "1", "--output", str(grid)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert grid.is_file()
