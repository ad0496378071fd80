"""Packaging for diffmoe-hf.

The repository keeps the user-facing folders (`pipelines/`, `conversion/`, ...) at the top level, but installs them as
sub-packages of the single import package `diffmoe_hf` (`diffmoe_hf.pipelines`, `diffmoe_hf.conversion`, ...), so each
piece of code has exactly one home and one import path.
"""

import ast
import os

from setuptools import setup


HERE = os.path.dirname(os.path.abspath(__file__))

# top-level folder -> installed sub-package of diffmoe_hf
TOP_LEVEL_SUBPACKAGES = {
    "pipelines": "diffmoe_hf.pipelines",
    "conversion": "diffmoe_hf.conversion",
    "training": "diffmoe_hf.training",
    "space": "diffmoe_hf.space",
}


def _packages():
    package_dir = {"diffmoe_hf": "diffmoe_hf"}
    packages = []
    for root, _, files in os.walk(os.path.join(HERE, "diffmoe_hf")):
        if "__init__.py" in files:
            packages.append(os.path.relpath(root, HERE).replace(os.sep, "."))
    for folder, package in TOP_LEVEL_SUBPACKAGES.items():
        if os.path.isfile(os.path.join(HERE, folder, "__init__.py")):
            package_dir[package] = folder
            packages.append(package)
    return sorted(packages), package_dir


def _read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def _diffusers_floors():
    """The string constants of diffmoe_hf/diffusers_floors.py (`CORE`, `TRAIN`), read without importing the package."""
    tree = ast.parse(_read(os.path.join("diffmoe_hf", "diffusers_floors.py")))
    return {
        target.id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
    }


packages, package_dir = _packages()
diffusers_floors = _diffusers_floors()

core = [
    "torch>=2.4",
    f"diffusers>={diffusers_floors['CORE']}",  # diffmoe_hf/diffusers_floors.py says why
    "accelerate>=1.0",  # meta-device model construction for low-memory checkpoint conversion
    "safetensors>=0.4",
    "huggingface_hub>=0.34",
    "numpy",
    "Pillow",
    "pyyaml",
    "tqdm",
]
extras = {
    "train": ["accelerate>=1.0", "peft>=0.17", "datasets>=3.0", f"diffusers>={diffusers_floors['TRAIN']}"],
    "space": ["gradio>=5.0"],
    # FID (diffmoe evaluate) also needs torch-fidelity, installed WITHOUT its dependencies:
    # `pip install --no-deps torch-fidelity==0.4.0` (diffmoe_hf/evaluation/inception.py says why)
    "eval": ["scikit-learn>=1.3", "scipy"],
}
# torchao (quantization_config) is in no extra: diffusers imports it whenever it is installed, and on a machine where
# its compiled kernels do not load (CPU-only torch) every command then starts seconds slower with five warning lines.
# Install it where you quantize; CI installs it for the quantization tests (.ci/run).
extras["dev"] = sorted(
    {dep for deps in extras.values() for dep in deps}
    | {"pytest>=8", "pytest-xdist>=3.5", "playwright", "ruff==0.17.6"}
)

setup(
    name="diffmoe-hf",
    version="0.1.0",
    description="Diffusion Mixture-of-Experts transformers (DSMoE, Diff-MoE, DiffMoE, DiT-MoE, JiTMoE) for diffusers",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={
        "diffmoe_hf": [
            "data/*.json",
            # the digits models shipped with the package (diffmoe_hf.default_models())
            "data/models/*/*.json",
            "data/models/*/*.md",
            "data/models/*/*.png",
            "data/models/*/*/*.json",
            "data/models/*/*/*.safetensors",
        ]
    },
    install_requires=core,
    extras_require=extras,
    entry_points={"console_scripts": ["diffmoe = diffmoe_hf.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
