"""The reviewed policies kms ships: ``authz.yaml``, ``quorum.yaml``, ``limits.yaml`` and the card profiles
(``profiles/*.yaml``).

They are package data, found with importlib.resources, so an installed kms (a wheel, not a checkout) reads the same
files the repository reviews; there is no other copy. A deployment may name its own authorization or quorum policy
in ``kms.yaml`` (``server.policy``, ``server.quorum_policy``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def shipped(name: str) -> Path:
    """The path of a policy file (or folder) shipped in the package, e.g. ``shipped("authz.yaml")``."""
    resource = files(__name__).joinpath(name)
    # The loaders read by path and name the path in their errors; setuptools installs a wheel as files, so the
    # resource is one. A zipped installation is not supported.
    if not isinstance(resource, Path):
        raise RuntimeError(f"kms policy {name!r} is not a file on disk ({resource!r}); install kms unzipped")
    return resource
