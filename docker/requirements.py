"""Prints the requirements an image installs besides meshserve itself, read from pyproject.toml (pins: constraints.txt).

    python3 docker/requirements.py services     # the gateway, router and aggregator image
    python3 docker/requirements.py worker       # the CPU worker image
    python3 docker/requirements.py worker-gpu   # the CUDA worker image (adds the gpu extra: Triton)

The services image gets the base dependencies without the worker's model stack (the gateway, router and aggregator
never import it; tests/test_images.py checks that they serve without it) and the k8s extra (the router's
EndpointSlice discovery). The worker images get every base dependency; torch itself comes first, from the torch
index (a build argument), so pip never picks the multi-GB CUDA wheel for a CPU image. Standard library only: it runs
in the image's fresh venv before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# The worker's model stack: what the services image leaves out.
WORKER_ONLY = frozenset({"torch", "transformers", "safetensors", "numpy"})
# Extras each image adds to its dependencies.
EXTRAS = {"services": ("k8s",), "worker": (), "worker-gpu": ("gpu",)}


def project_name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(image: str, pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    dependencies: list[str] = list(project["dependencies"])
    missing = WORKER_ONLY - {project_name(r) for r in dependencies}
    if missing:  # a renamed dependency would otherwise slip into the services image unseen
        raise SystemExit(f"docker/requirements.py: {sorted(missing)} are no longer dependencies in pyproject.toml")
    if image == "services":
        dependencies = [r for r in dependencies if project_name(r) not in WORKER_ONLY]
    for extra in EXTRAS[image]:
        dependencies += project["optional-dependencies"][extra]
    return dependencies


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in EXTRAS:
        print(f"usage: python3 docker/requirements.py {{{','.join(EXTRAS)}}}", file=sys.stderr)
        return 2
    print("\n".join(requirements(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
