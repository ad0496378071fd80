"""The lowest diffusers versions diffmoe-hf declares, installed on top of the dev environment for CI's floor runs.

    python .ci/floor.py version [EXTRA]   prints the diffusers floor of the core install, or of EXTRA (e.g. train),
                                          from the installed diffmoe-hf metadata (setup.py)
    python .ci/floor.py unmet DIR         prints the requirements of the distributions in DIR (a `pip install
                                          --target` folder, searched first) that the environment does not satisfy
    python .ci/floor.py check DIR VERSION fails unless DIR's diffusers is VERSION and every requirement is satisfied
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


def unmet_requirements(folder: str) -> list[str]:
    paths = [folder, *sys.path]
    unmet = []
    for dist in importlib.metadata.distributions(path=[folder]):
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # an extra, or another platform / Python
            found = next(importlib.metadata.distributions(name=requirement.name, path=paths), None)
            if found is None or not requirement.specifier.contains(found.version, prereleases=True):
                unmet.append(str(requirement))
    return sorted(set(unmet))


def main(command: str, *args: str) -> int:
    if command == "version":
        print(floor_version(*args))
        return 0
    unmet = unmet_requirements(args[0])
    if command == "unmet":
        for requirement in unmet:
            print(requirement)
        return 0
    problems = [f"unmet requirement {requirement}" for requirement in unmet]
    installed = importlib.metadata.version("diffusers")
    if installed != args[1]:
        problems.append(f"diffusers {installed} comes first on the path, not {args[1]}")
    for problem in problems:
        print(f"floor environment: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
