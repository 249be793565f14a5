"""The project's OCI image, built without Docker, and the pod sandbox ("pause") image.

No container registry is needed (none may be reachable) and no Docker engine: the root
filesystem is assembled from Debian packages (``apt-get download`` + ``dpkg-deb``, no
maintainer scripts, no package manager in the image: a distroless-like base with Debian's
``python3.11``), the application is a virtualenv made inside that root (``chroot``) from the
project's wheel and its dependencies' wheels from PyPI, and the result is packed as an OCI
image with ``umoci`` and turned into a ``docker-archive`` with ``skopeo`` for
``ctr images import``. Two layers: the OS (packages) and ``/opt/datamesh`` (the virtualenv).

It is the image ``operator/Dockerfile`` describes (entry point ``datamesh``, numeric user
10001, ports 8080/8081/9090, the same environment and labels, the package with the same
extras): ``tests/unit/test_image_config.py`` parses the Dockerfile and compares it with
:data:`CONFIG` and :data:`DEFAULT_EXTRAS`; the e2e tier compares the built image's config too.

Built images are cached under ``${XDG_CACHE_HOME:-~/.cache}/datamesh/images/`` by a hash of
every input (this file, the package sources and README, the packaging tables of
``pyproject.toml``, the extras, the Debian package versions), so a re-run with nothing changed
returns in seconds. Needs root (``chroot``), apt lists (``apt-get update``), ``umoci`` and
``skopeo`` (``hack/e2e/install-deps.sh``).

    python -m datamesh_dev.image build            # prints image=<ref>, archive=<path>, ...
    python -m datamesh_dev.image pause <binary>   # the sandbox image from hack/e2e/pause
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datamesh_dev.devcluster import repo_root

__all__ = [
    "CONFIG",
    "DEB_EXCLUDE",
    "DEB_SEEDS",
    "DEFAULT_EXTRAS",
    "IMAGE_REPOSITORY",
    "PAUSE_REPOSITORY",
    "BuiltImage",
    "ImageConfig",
    "ImageError",
    "build_image",
    "build_pause_image",
    "requirements",
]

IMAGE_REPOSITORY = "datamesh.local/datamesh"
PAUSE_REPOSITORY = "datamesh.local/pause"
PYTHON = "python3.11"  # Debian 12's, the minor version of the Dockerfile's python:3.11 base
VENV = "/opt/datamesh"
# The PATH of a Debian/Docker base image, which the Dockerfile's ENV PATH=/opt/datamesh/bin:$PATH extends.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Optional extras of pyproject.toml in the image: the Dockerfile's ARG EXTRAS default.
DEFAULT_EXTRAS: tuple[str, ...] = ("parquet",)

# The Debian packages of the root filesystem: Python 3.11 with its whole standard library, the C++
# runtime that manylinux wheels (numpy, pyarrow, grpcio, qdrant-edge) link against, CA
# certificates, time zones and /etc/services. Their Depends are followed, except into
# DEB_EXCLUDE: package-management and maintainer-script machinery that nothing runs here.
DEB_SEEDS: tuple[str, ...] = (
    "base-files",
    "netbase",
    "tzdata",
    "ca-certificates",
    "libc6",
    "libgcc-s1",
    "libstdc++6",
    f"{PYTHON}-minimal",
    f"lib{PYTHON}-stdlib",
)
DEB_EXCLUDE: frozenset[str] = frozenset(
    {
        "debconf",
        "debconf-2.0",
        "cdebconf",
        "dpkg",
        "install-info",
        "perl",
        "perl-base",
        "perl-modules-5.36",
        "libperl5.36",
        "tar",
        "openssl",  # ca-certificates' update script; the bundle is assembled here instead
        "mawk",
        "awk",
        "debianutils",
        "init-system-helpers",
        "usrmerge",
    }
)
# Documentation, manuals and translations: never read in a container.
_PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian", "var/cache")


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an OCI image config (what ``docker inspect`` shows under Config)."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    user: str
    workdir: str
    ports: tuple[int, ...]
    env: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)

    def umoci_args(self) -> list[str]:
        args = [f"--config.user={self.user}", f"--config.workingdir={self.workdir}", "--clear=config.entrypoint"]
        args += [f"--config.entrypoint={e}" for e in self.entrypoint]
        args += ["--clear=config.cmd", *(f"--config.cmd={c}" for c in self.cmd)]
        args += ["--clear=config.exposedports", *(f"--config.exposedports={p}/tcp" for p in self.ports)]
        args += ["--clear=config.env", *(f"--config.env={k}={v}" for k, v in self.env.items())]
        args += ["--clear=config.labels", *(f"--config.label={k}={v}" for k, v in self.labels.items())]
        return args


# What operator/Dockerfile declares for its runtime stage (LANG comes with its python base image).
CONFIG = ImageConfig(
    entrypoint=("datamesh",),
    cmd=("--help",),
    user="10001:10001",
    workdir="/tmp",
    ports=(8080, 8081, 9090),
    env={
        "PATH": f"{VENV}/bin:{BASE_PATH}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "HOME": "/tmp",
        "XDG_CACHE_HOME": "/tmp/.cache",
        "ORT_DISABLE_TELEMETRY": "1",
        "LANG": "C.UTF-8",
    },
    labels={
        "org.opencontainers.image.title": "datamesh",
        "org.opencontainers.image.description": (
            "Datamesh Operator: DataProduct operator, federated query service and inference runtime"
        ),
        "org.opencontainers.image.source": "https://github.com/datamesh-io/datamesh-operator",
        "org.opencontainers.image.licenses": "Apache-2.0",
    },
)
USER_NAME = "datamesh"
UID = GID = 10001

PAUSE_CONFIG = ImageConfig(
    entrypoint=("/pause",), cmd=(), user="65535:65535", workdir="/", ports=(), env={"PATH": BASE_PATH}
)


class ImageError(RuntimeError):
    """The image could not be built (a missing tool, package or wheel, or a failed step)."""


@dataclass(frozen=True)
class BuiltImage:
    """A built image: its reference, the docker-archive to import, and what it took."""

    ref: str
    archive: Path
    oci_layout: Path
    key: str
    cached: bool
    seconds: float
    compressed_bytes: int
    uncompressed_bytes: int
    packages: Mapping[str, str] = field(default_factory=dict)  # distribution -> version, in the venv

    def summary(self) -> dict[str, object]:
        return {
            "image": self.ref,
            "archive": str(self.archive),
            "oci": str(self.oci_layout),
            "cached": self.cached,
            "seconds": round(self.seconds, 1),
            "compressed_mb": round(self.compressed_bytes / 1e6, 1),
            "uncompressed_mb": round(self.uncompressed_bytes / 1e6, 1),
        }


def default_cache() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "datamesh" / "images"


# --------------------------------------------------------------------------------------------
# Inputs


def requirements(repo: Path, extras: Sequence[str] = DEFAULT_EXTRAS) -> list[str]:
    """The package's dependencies plus those of ``extras``, from pyproject.toml (as the Dockerfile does)."""
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise ImageError(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    return [*project["dependencies"], *(d for e in extras for d in optional[e])]


def _packaging(repo: Path) -> bytes:
    """What of pyproject.toml goes into the wheel (not the test, lint and tool settings)."""
    data = tomllib.loads((repo / "pyproject.toml").read_text())
    tool = {k: v for k, v in data.get("tool", {}).items() if k.startswith("setuptools")}
    wanted = {"project": data["project"], "build-system": data.get("build-system"), "tool": tool}
    return json.dumps(wanted, sort_keys=True).encode()


def _source_files(repo: Path) -> Iterator[Path]:
    yield repo / "README.md"  # the wheel's long description
    yield Path(__file__)
    for path in sorted((repo / "operator").rglob("*")):
        rel = path.relative_to(repo).as_posix()
        if path.is_file() and "__pycache__" not in rel and ".egg-info" not in rel and not rel.endswith(".pyc"):
            yield path


def _run(args: Sequence[str | Path], *, cwd: Path | None = None, what: str = "", **kwargs: object) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise ImageError(
            f"{what or args[0]} failed (exit {proc.returncode}): {' '.join(map(str, args))}\n{proc.stderr[-4000:]}"
        )
    return str(proc.stdout)


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ImageError(f"missing {', '.join(missing)}: run hack/e2e/install-deps.sh (as root)")


def deb_closure(seeds: Iterable[str] = DEB_SEEDS, exclude: frozenset[str] = DEB_EXCLUDE) -> dict[str, str]:
    """``{package: candidate version}``: the seeds and what they depend on, never entering ``exclude``."""
    seeds = list(seeds)
    # One recursive listing (apt-cache is slow to start), walked here with the exclusions.
    skip = ["--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances"]
    listing = _run(["apt-cache", "depends", "--recurse", *skip, *seeds], what="apt-cache depends")
    graph: dict[str, list[str]] = {}
    current: list[str] | None = None
    alternative = False
    for line in listing.splitlines():
        if not line.startswith(" "):
            current = graph.setdefault(line.strip().strip("<>").split(":")[0], [])
            alternative = False
            continue
        m = re.match(r"^\s+(\|)?(?:Pre)?Depends: <?([^<>\s]+)>?", line)
        if m is None or current is None:
            alternative = False
            continue
        # "|Depends: a" then "Depends: b" are alternatives: the first one is taken.
        if not alternative:
            current.append(m.group(2).split(":")[0])
        alternative = bool(m.group(1))
    wanted: list[str] = []
    todo = [p for p in seeds if p not in exclude]
    while todo:
        name = todo.pop()
        if name in wanted or name in exclude:
            continue
        wanted.append(name)
        todo.extend(graph.get(name, []))
    policy = _run(["apt-cache", "policy", *wanted], what="apt-cache policy")
    versions = {}
    for name, candidate in re.findall(r"^(\S+):\n(?:.*\n)*?\s+Candidate: (\S+)", policy, re.MULTILINE):
        if candidate == "(none)":
            raise ImageError(f"no installable candidate for Debian package {name}: run `apt-get update`")
        versions[name.split(":")[0]] = candidate
    missing = [p for p in wanted if p not in versions]
    if missing:
        raise ImageError(f"apt knows no package {missing}: run `apt-get update` (hack/e2e/install-deps.sh)")
    return dict(sorted(versions.items()))


def input_key(repo: Path, extras: Sequence[str], debs: Mapping[str, str]) -> str:
    """The cache key: a hash of every input of the image."""
    h = hashlib.sha256(_packaging(repo))
    for path in _source_files(repo):
        h.update(path.relative_to(repo if path.is_relative_to(repo) else path.parent).as_posix().encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    h.update(json.dumps({"extras": sorted(extras), "debs": debs, "python": PYTHON}).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Building blocks


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One build per cache entry at a time (a second caller waits, then finds it built)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_debs(debs: Mapping[str, str], cache: Path) -> list[Path]:
    """The .deb files, from apt's sources into ``cache`` (kept: versions are in the names)."""
    cache.mkdir(parents=True, exist_ok=True)

    def filename(name: str, version: str) -> str:
        return f"{name}_{version.replace(':', '%3a')}_"

    have = {p.name for p in cache.glob("*.deb")}
    wanted = {n: v for n, v in debs.items() if not any(h.startswith(filename(n, v)) for h in have)}
    if wanted:
        _run(["apt-get", "download", *(f"{n}={v}" for n, v in wanted.items())], cwd=cache, what="apt-get download")
    files = []
    for name, version in debs.items():
        found = sorted(cache.glob(filename(name, version) + "*.deb"))
        if not found:
            raise ImageError(f"apt-get download gave no file for {name} {version}")
        files.append(found[0])
    return files


def _extract_debs(files: Iterable[Path], rootfs: Path) -> None:
    """Unpack the packages' files (no maintainer scripts) into a merged-/usr root."""
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "etc", "var", "opt"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        (rootfs / link).symlink_to(f"usr/{link}")
    for deb in files:
        data = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        untar = subprocess.run(
            ["tar", "-x", "--keep-directory-symlink", "-C", str(rootfs)], stdin=data.stdout, capture_output=True
        )
        assert data.stdout is not None
        data.stdout.close()
        if data.wait() != 0 or untar.returncode != 0:
            raise ImageError(f"could not unpack {deb.name}: {untar.stderr.decode()[-2000:]}")


def _configure_os(rootfs: Path) -> None:
    """What maintainer scripts and adduser would have done, by hand: users, CA bundle, ld cache."""
    etc = rootfs / "etc"
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"{USER_NAME}:x:{UID}:{GID}::/nonexistent:/usr/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    (etc / "group").write_text(f"root:x:0:\n{USER_NAME}:x:{GID}:\nnogroup:x:65534:\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\nservices: files\n")
    # /etc/ssl/certs/ca-certificates.crt, as update-ca-certificates assembles it.
    certs = sorted((rootfs / "usr/share/ca-certificates").rglob("*.crt"))
    if not certs:
        raise ImageError("ca-certificates brought no certificates")
    (etc / "ssl/certs").mkdir(parents=True, exist_ok=True)
    (etc / "ssl/certs/ca-certificates.crt").write_text("".join(c.read_text() for c in certs))
    tmp = rootfs / "tmp"
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o1777)
    (etc / "ld.so.conf").write_text("/usr/local/lib\n/usr/lib/x86_64-linux-gnu\n")
    _run(["ldconfig", "-r", rootfs], what="ldconfig")
    for rel in _PRUNE:
        shutil.rmtree(rootfs / rel, ignore_errors=True)
    (rootfs / "var/cache").mkdir(parents=True, exist_ok=True)


def _manylinux_platforms() -> list[str]:
    # Debian 12 has glibc 2.36: every manylinux tag up to it, and the legacy aliases.
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def _wheelhouse(repo: Path, reqs: Sequence[str], cache: Path, work: Path) -> tuple[Path, Path]:
    """The requirements' wheels (CPython 3.11, glibc 2.36; cached by requirement set) and the project's wheel."""
    key = hashlib.sha256("\n".join([*sorted(reqs), "pip"]).encode()).hexdigest()[:16]
    wheels = cache / f"wheels-{key}"
    if not (wheels / ".complete").exists():
        partial = Path(tempfile.mkdtemp(prefix=f"wheels-{key}.", dir=cache))
        (partial / "requirements.txt").write_text("\n".join(reqs) + "\n")
        target = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
        target += ["--abi", "cp311", "--abi", "abi3", "--abi", "none"]
        target += [a for p in _manylinux_platforms() for a in ("--platform", p)]
        download: list[str | Path] = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", partial]
        download += ["--disable-pip-version-check", *target, "-r", partial / "requirements.txt", "pip"]
        _run(download, what="pip download")
        (partial / ".complete").touch()
        shutil.rmtree(wheels, ignore_errors=True)
        partial.rename(wheels)
    dist = work / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps", "-w", dist, repo],
        what="pip wheel (the project)",
    )
    (project,) = dist.glob("datamesh_operator-*.whl")
    return wheels, project


# Runs in a private mount namespace: /proc and /dev/shm (multiprocessing wants both) are mounted
# for the one command and vanish with it, whatever happens.
_IN_NAMESPACE = 'mount -t proc proc "$0/proc" && mount -t tmpfs -o size=64m shm "$0/dev/shm" && exec chroot "$@"'


def _chroot(rootfs: Path, *args: str, user: str | None = None, env: Mapping[str, str] | None = None) -> str:
    spec = ["--userspec", user] if user else []
    environment = {"PATH": CONFIG.env["PATH"], "LANG": "C.UTF-8", "HOME": "/tmp", **(env or {})}
    for d in ("proc", "dev/shm"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    return _run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", _IN_NAMESPACE, rootfs, *spec, rootfs, *args],
        env=environment,
        what=f"in the image: {' '.join(args[:3])}",
    )


def _install_venv(rootfs: Path, wheels: Path, project: Path, reqs: Sequence[str]) -> dict[str, str]:
    """The virtualenv at /opt/datamesh, made by the image's own Python; returns its distributions."""
    staging = rootfs / "tmp/wheels"
    shutil.copytree(wheels, staging)
    shutil.copy2(project, staging / project.name)
    (staging / "requirements.txt").write_text("\n".join(reqs) + "\n")
    (pip,) = sorted(staging.glob("pip-*.whl"))
    dev = rootfs / "dev"
    dev.mkdir(exist_ok=True)
    null = dev / "null"
    if not null.exists():
        os.mknod(null, 0o666 | 0o020000, os.makedev(1, 3))
    try:
        _chroot(rootfs, f"/usr/bin/{PYTHON}", "-m", "venv", "--without-pip", VENV)
        pip_cmd = [f"{VENV}/bin/python", f"/tmp/wheels/{pip.name}/pip", "install", "--quiet", "--no-index"]
        pip_cmd += ["--disable-pip-version-check", "--no-compile", "--find-links", "/tmp/wheels"]
        _chroot(rootfs, *pip_cmd, "-r", "/tmp/wheels/requirements.txt")
        _chroot(rootfs, *pip_cmd, "--no-deps", f"/tmp/wheels/{project.name}")
        # Bytecode now: the root filesystem is read-only at run time (and PYTHONDONTWRITEBYTECODE is set).
        _chroot(rootfs, f"{VENV}/bin/python", "-m", "compileall", "-q", "-j", "0", f"{VENV}/lib", f"/usr/lib/{PYTHON}")
        _chroot(rootfs, f"{VENV}/bin/datamesh", "--help", user=f"{UID}:{GID}")
        listing = _chroot(rootfs, f"{VENV}/bin/python", "-c", _LIST_DISTRIBUTIONS)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        null.unlink(missing_ok=True)
        shutil.rmtree(dev / "shm", ignore_errors=True)
    return dict(sorted(json.loads(listing).items()))


_LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
)


def _dir_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _pack(layers: Sequence[tuple[Path, str]], config: ImageConfig, ref: str, dest: Path) -> tuple[Path, Path, int]:
    """An OCI layout (umoci: one layer per (folder, target)) and a docker-archive of it (skopeo)."""
    layout = dest / "oci"
    tag = ref.rsplit(":", 1)[1]
    _run(["umoci", "init", "--layout", layout], what="umoci init")
    _run(["umoci", "new", "--image", f"{layout}:{tag}"], what="umoci new")
    for folder, target in layers:
        _run(["umoci", "insert", "--image", f"{layout}:{tag}", folder, target], what="umoci insert")
    _run(["umoci", "config", "--image", f"{layout}:{tag}", "--no-history", *config.umoci_args()], what="umoci config")
    _run(["umoci", "gc", "--layout", layout], what="umoci gc")
    archive = dest / "image.tar"
    _run(["skopeo", "copy", "--quiet", f"oci:{layout}:{tag}", f"docker-archive:{archive}:{ref}"], what="skopeo copy")
    return layout, archive, _layers_bytes(layout)


def _layers_bytes(layout: Path) -> int:
    index = json.loads((layout / "index.json").read_text())
    total = 0
    for desc in index["manifests"]:
        manifest = json.loads(_blob(layout, desc["digest"]).read_text())
        total += sum(layer["size"] for layer in manifest["layers"])
    return total


def _blob(layout: Path, digest: str) -> Path:
    algo, hexdigest = digest.split(":", 1)
    return layout / "blobs" / algo / hexdigest


def oci_config(layout: Path) -> dict[str, object]:
    """The image config (``config`` part) of the one image in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]).read_text())
    config = json.loads(_blob(layout, manifest["config"]["digest"]).read_text())
    return dict(config["config"])


# --------------------------------------------------------------------------------------------
# The images


def _cached(dest: Path, ref: str, key: str, t0: float) -> BuiltImage | None:
    meta_path = dest / "image.json"
    if not meta_path.exists() or not (dest / "image.tar").exists():
        return None
    meta = json.loads(meta_path.read_text())
    return BuiltImage(
        ref=ref,
        archive=dest / "image.tar",
        oci_layout=dest / "oci",
        key=key,
        cached=True,
        seconds=time.monotonic() - t0,
        compressed_bytes=meta["compressed_bytes"],
        uncompressed_bytes=meta["uncompressed_bytes"],
        packages=meta.get("packages", {}),
    )


def _publish(dest: Path, work: Path, image: BuiltImage) -> BuiltImage:
    meta = {
        "ref": image.ref,
        "key": image.key,
        "build_seconds": round(image.seconds, 1),
        "compressed_bytes": image.compressed_bytes,
        "uncompressed_bytes": image.uncompressed_bytes,
        "packages": dict(image.packages),
    }
    (work / "out" / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    (work / "out").rename(dest)
    return BuiltImage(
        image.ref,
        dest / "image.tar",
        dest / "oci",
        image.key,
        False,
        image.seconds,
        image.compressed_bytes,
        image.uncompressed_bytes,
        image.packages,
    )


KEEP_IMAGES = 3  # built datamesh images kept in the cache (about 0.6 GB each), newest first


def _prune(cache: Path, prefix: str, keep: int = KEEP_IMAGES) -> None:
    """Remove all but the ``keep`` most recently built images of ``prefix`` (never one being built)."""
    built = sorted(
        (d for d in cache.glob(f"{prefix}-*") if d.is_dir() and (d / "image.json").exists()),
        key=lambda d: (d / "image.json").stat().st_mtime,
        reverse=True,
    )
    for old in built[keep:]:
        with open(old.with_name(old.name + ".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # someone is building or reading it
            shutil.rmtree(old, ignore_errors=True)


def build_image(
    repo: Path | None = None,
    *,
    extras: Sequence[str] = DEFAULT_EXTRAS,
    cache: Path | None = None,
    force: bool = False,
    log: bool = True,
) -> BuiltImage:
    """Build (or find in the cache) the datamesh image; see the module docstring."""
    t0 = time.monotonic()
    repo = (repo or repo_root()).resolve()
    cache = (cache or default_cache()).resolve()
    _need("apt-get", "apt-cache", "dpkg-deb", "tar", "chroot", "unshare", "ldconfig", "umoci", "skopeo")
    if os.geteuid() != 0:
        raise ImageError("building the image needs root (chroot, and files owned by root in the image)")
    debs = deb_closure()
    reqs = requirements(repo, extras)
    key = input_key(repo, extras, debs)
    version = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"]
    ref = f"{IMAGE_REPOSITORY}:{version}-{key[:12]}"
    dest = cache / f"datamesh-{key}"
    with _locked(cache / f"datamesh-{key}.lock"):
        if not force and (hit := _cached(dest, ref, key, t0)) is not None:
            return hit
        work = Path(tempfile.mkdtemp(prefix=f"datamesh-{key}.build.", dir=cache))
        try:
            os_root, app_root = work / "os", work / "app"
            if log:
                print(f"image: {len(debs)} Debian packages, {len(reqs)} requirements -> {ref}", file=sys.stderr)
            _extract_debs(_download_debs(debs, cache / "debs"), os_root)
            _configure_os(os_root)
            wheels, project = _wheelhouse(repo, reqs, cache, work)
            packages = _install_venv(os_root, wheels, project, reqs)
            # The virtualenv becomes its own layer: move it out of the OS root.
            app_root.mkdir()
            shutil.move(str(os_root / VENV.lstrip("/")), app_root / "datamesh")
            (work / "out").mkdir()
            uncompressed = _dir_bytes(os_root) + _dir_bytes(app_root)
            _, _, compressed = _pack([(os_root, "/"), (app_root / "datamesh", VENV)], CONFIG, ref, work / "out")
            built = BuiltImage(
                ref, Path(), Path(), key, False, time.monotonic() - t0, compressed, uncompressed, packages
            )
            published = _publish(dest, work, built)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _prune(cache, "datamesh")
    return published


def build_pause_image(binary: Path, cache: Path | None = None) -> BuiltImage:
    """The pod sandbox image: the static binary of hack/e2e/pause as /pause, user 65535."""
    t0 = time.monotonic()
    cache = (cache or default_cache()).resolve()
    _need("umoci", "skopeo")
    h = hashlib.sha256(binary.read_bytes())
    h.update(json.dumps(PAUSE_CONFIG.umoci_args()).encode())
    key = h.hexdigest()[:16]
    ref = f"{PAUSE_REPOSITORY}:{key[:12]}"
    dest = cache / f"pause-{key}"
    with _locked(cache / f"pause-{key}.lock"):
        if (hit := _cached(dest, ref, key, t0)) is not None:
            return hit
        work = Path(tempfile.mkdtemp(prefix=f"pause-{key}.build.", dir=cache))
        try:
            root = work / "root"
            root.mkdir()
            shutil.copy2(binary, root / "pause")
            (root / "pause").chmod(0o755)
            (work / "out").mkdir()
            _, _, compressed = _pack([(root, "/")], PAUSE_CONFIG, ref, work / "out")
            built = BuiltImage(ref, Path(), Path(), key, False, time.monotonic() - t0, compressed, _dir_bytes(root))
            return _publish(dest, work, built)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datamesh_dev.image", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or find cached) the datamesh image")
    b.add_argument("--extras", default=",".join(DEFAULT_EXTRAS), help="comma-separated extras (the Dockerfile's ARG)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    p = sub.add_parser("pause", help="build (or find cached) the pause image from a binary")
    p.add_argument("binary", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            image = build_image(extras=[e for e in args.extras.split(",") if e], force=args.force)
        else:
            image = build_pause_image(args.binary)
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for k, v in image.summary().items():
        print(f"{k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
