"""The image built without Docker (datamesh_dev.image) is the image operator/Dockerfile describes.

tests/unit/test_image_config.py compares the Dockerfile with what the script declares; here the
built image itself is read back: its OCI config (entry point, command, user, ports, environment,
working folder, labels) against the parsed Dockerfile, and the distributions installed in its
virtualenv against pyproject.toml with the Dockerfile's default extras. A second build with the
same inputs comes from the cache.
"""

from __future__ import annotations

import re
import time
import tomllib
from pathlib import Path

from datamesh_dev import image
from tests.e2e.conftest import REPORT, seconds
from tests.unit.test_image_config import BUILD, RUNTIME

REPO = Path(__file__).resolve().parents[2]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_built_config_is_the_dockerfiles(datamesh_image: image.BuiltImage) -> None:
    config = image.oci_config(datamesh_image.oci_layout)
    assert config["Entrypoint"] == RUNTIME.entrypoint
    assert config["Cmd"] == RUNTIME.cmd
    assert config["User"] == RUNTIME.user
    assert config["WorkingDir"] == RUNTIME.workdir
    assert sorted(config["ExposedPorts"]) == sorted(f"{p}/tcp" for p in RUNTIME.ports)  # type: ignore[arg-type]
    env = dict(e.split("=", 1) for e in config["Env"])  # type: ignore[attr-defined]
    assert env == {**RUNTIME.env, "LANG": "C.UTF-8"}
    assert config["Labels"] == RUNTIME.labels


def test_built_image_holds_the_package_with_the_dockerfiles_extras(datamesh_image: image.BuiltImage) -> None:
    installed = {canonical(name): version for name, version in datamesh_image.packages.items()}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert installed["datamesh-operator"] == project["version"]
    extras = tuple(e for e in BUILD.args["EXTRAS"].split(",") if e)
    for requirement in image.requirements(REPO, extras):
        name = canonical(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])
        assert name in installed, f"{requirement} is not installed in the image"


def test_a_second_build_comes_from_the_cache(datamesh_image: image.BuiltImage) -> None:
    t0 = time.monotonic()
    again = image.build_image()
    REPORT.setdefault("image", {})["cached rebuild s"] = seconds(time.monotonic() - t0)
    assert again.cached and again.ref == datamesh_image.ref and again.archive == datamesh_image.archive
    assert time.monotonic() - t0 < 30
