"""operator/Dockerfile and the Docker-free image build (datamesh_dev.image) describe the same image.

The Dockerfile's runtime stage is parsed (continuations, ARG defaults, ENV with $VAR expansion,
LABEL, USER, EXPOSE, WORKDIR, ENTRYPOINT, CMD) and compared with the image config the build
script gives umoci, and with the package and extras it installs. The e2e tier
(tests/e2e/test_image.py) makes the same comparison against the config of the built image.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from datamesh_dev import image

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "operator" / "Dockerfile"


@dataclass
class Stage:
    base: str
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    workdir: str | None = None
    ports: list[int] = field(default_factory=list)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    run: list[str] = field(default_factory=list)
    copy: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pairs(arguments: str, variables: dict[str, str]) -> dict[str, str]:
    """ENV/LABEL/ARG key=value pairs (shell-quoted), with $VAR and ${VAR} expanded."""
    result = {}
    for token in shlex.split(arguments):
        key, sep, value = token.partition("=")
        if not sep:
            continue
        result[key] = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m.group(1), ""), value)
        variables[key] = result[key]
    return result


def parse(text: str) -> list[Stage]:
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for word, rest in instructions(text):
        if word == "FROM":
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), ""), rest.split()[0])
            # Variables a base image brings: the standard PATH of Debian-based images.
            stages.append(Stage(base=base, env={"PATH": image.BASE_PATH}))
            continue
        if not stages:
            if word == "ARG":
                global_args.update(pairs(rest, dict(global_args)))
            continue
        stage = stages[-1]
        variables = {**stage.args, **stage.env}
        if word == "ARG":
            stage.args.update(pairs(rest, variables))
        elif word == "ENV":
            stage.env.update(pairs(rest, variables))
        elif word == "LABEL":
            stage.labels.update(pairs(rest, variables))
        elif word == "USER":
            stage.user = rest
        elif word == "WORKDIR":
            stage.workdir = rest
        elif word == "EXPOSE":
            stage.ports += [int(p.split("/")[0]) for p in rest.split()]
        elif word == "ENTRYPOINT":
            stage.entrypoint = json.loads(rest)
        elif word == "CMD":
            stage.cmd = json.loads(rest)
        elif word == "RUN":
            stage.run.append(rest)
        elif word == "COPY":
            stage.copy.append(rest)
    return stages


STAGES = parse(DOCKERFILE.read_text())
BUILD, RUNTIME = STAGES[0], STAGES[-1]


def test_the_dockerfile_parses_into_a_build_and_a_runtime_stage() -> None:
    assert len(STAGES) == 2
    assert BUILD.base == RUNTIME.base and BUILD.base.startswith("python:3.11")
    assert image.PYTHON == "python3.11", "the script's Python must be the Dockerfile's minor version"


def test_entrypoint_cmd_user_workdir_and_ports_are_the_same() -> None:
    config = image.CONFIG
    assert RUNTIME.entrypoint == list(config.entrypoint) == ["datamesh"]
    assert RUNTIME.cmd == list(config.cmd)
    assert RUNTIME.user == config.user == "10001:10001"
    assert RUNTIME.workdir == config.workdir
    assert sorted(RUNTIME.ports) == sorted(config.ports) == [8080, 8081, 9090]


def test_environment_and_labels_are_the_same() -> None:
    expected = dict(RUNTIME.env)
    # The python:3.11 base image sets LANG=C.UTF-8 (and version variables the script has no use for).
    expected["LANG"] = "C.UTF-8"
    assert dict(image.CONFIG.env) == expected
    assert dict(image.CONFIG.labels) == RUNTIME.labels


def test_the_same_package_with_the_same_extras_in_the_same_place() -> None:
    assert tuple(e for e in BUILD.args["EXTRAS"].split(",") if e) == image.DEFAULT_EXTRAS
    # The build stage installs pyproject's dependencies plus the extras', then the project itself
    # (`pip install --no-deps .`) into the virtualenv the runtime stage copies.
    assert any("python -m venv /opt/datamesh" in r for r in BUILD.run)
    assert any("pip install --no-deps ." in r for r in BUILD.run)
    assert any("p['dependencies']" in r and "optional-dependencies" in r for r in BUILD.run)
    assert "--from=build /opt/datamesh /opt/datamesh" in RUNTIME.copy
    assert image.VENV == "/opt/datamesh"
    reqs = image.requirements(REPO, image.DEFAULT_EXTRAS)
    assert any(r.startswith("pyarrow") for r in reqs), "the parquet extra brings pyarrow"
    assert any(r.startswith("qdrant-edge-py") for r in reqs), "the embedded store's engine is a dependency"


def test_the_dockerfile_user_exists_in_the_script_image() -> None:
    run = " ".join(RUNTIME.run)
    assert "--uid 10001" in run and "--gid 10001" in run and "--home-dir /nonexistent" in run
    assert (image.UID, image.GID, image.USER_NAME) == (10001, 10001, "datamesh")
