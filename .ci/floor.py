"""Prints the lowest diffusers version diffmoe-hf declares (setup.py, read from the installed metadata), for CI's
floor runs.

    python .ci/floor.py [EXTRA]   the floor of the core install, or of the install with EXTRA (e.g. train)
"""

import importlib.metadata
import sys

from packaging.requirements import Requirement


def floor_version(extra: str = "") -> str:
    """The highest `diffusers>=X` that applies to an install with `extra` ("" for the core install)."""
    floors = []
    for text in importlib.metadata.requires("diffmoe-hf"):
        requirement = Requirement(text)
        applies = requirement.marker is None or requirement.marker.evaluate({"extra": extra})
        if requirement.name == "diffusers" and applies:
            floors += [spec.version for spec in requirement.specifier if spec.operator == ">="]
    return max(floors, key=lambda version: tuple(int(part) for part in version.split(".")))


if __name__ == "__main__":
    print(floor_version(*sys.argv[1:2]))
