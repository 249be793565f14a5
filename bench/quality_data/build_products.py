#!/usr/bin/env python3
"""Regenerate the quality benchmark's data products from public text shipped on this machine.

The generated files are committed: the benchmark never needs this script to run. It exists so
the products can be rebuilt (and checked) from their sources:

    python3 bench/quality_data/build_products.py           # rewrite products/*.yaml and rows/*.jsonl
    python3 bench/quality_data/build_products.py --check   # exit 1 if a file would change

Each product is two files: its rows in ``rows/<name>.jsonl`` (one JSON object per line) and its
manifest ``products/<name>.yaml``, whose source is ``url: http://quality-data.invalid/rows/<name>.jsonl``
(format jsonl). The products have 225-299 rows, far over the 40 inline rows a manifest may hold
(the CRD and local mode refuse more, so a spec always fits its annotations), so the rows are a
file served over http(s), as large data is. ``.invalid`` is a reserved name that never resolves:
whoever applies the manifests serves ``rows/`` and puts its address in place of
``http://quality-data.invalid/`` (``bench/quality.py`` does so with a server on 127.0.0.1).

Standard library only (no PyYAML needed). Sources, all Debian 12 "bookworm" (amd64):

* Debian package descriptions (``platform/debian-network-tools``, ``platform/debian-mail-software``,
  ``media/debian-audio-software``): the archive's ``Packages`` index for bookworm/main and its
  English long descriptions (``Translation-en``). The Debian image here turns translations off,
  so fetch them once with

      apt-get update -o Acquire::Languages=en

  Read with ``/usr/lib/apt/apt-helper cat-file`` from ``/var/lib/apt/lists/``. Only the
  bookworm/main index is used (not -updates/-security), so point releases rarely change a row.
  Licence: each description is part of its (DFSG-free) package's metadata and is redistributed
  by Debian in these public indexes.

* Python standard library docstrings (``python/stdlib-concurrency``, ``python/stdlib-text-processing``):
  the interpreter of the Debian package ``python3.11`` / ``libpython3.11-stdlib`` (3.11.2-6+deb12u6,
  ``apt-get install -y python3.11``), run as ``/usr/bin/python3.11 -I`` in a subprocess whatever
  Python runs this script. Licence: PSF License Agreement (Python 3.11).

* Linux man-pages, section 2 (``linux/syscall-manual``): Debian package ``manpages-dev`` 6.03-2
  (``apt-get install -y manpages-dev man-db``), rendered with ``man --nh --nj -l`` and ``col -bx``.
  Licence: the Linux man-pages project's per-page licences, recorded in each row's ``license``
  field (mostly Linux-man-pages-copyleft, also GPL-2.0-or-later, GPL-1.0-or-later, GPL-2.0-only,
  BSD-4-Clause-UC, freely-redistributable and public-domain pages); see
  ``/usr/share/doc/manpages-dev/copyright``. Pages whose licence allows only verbatim copies
  (the project's VERBATIM_* tags) are left out, since a row is a trimmed excerpt.

Rows are chosen deterministically: Debian products keep one binary package per source package
(skipping libraries, -dev/-doc/-dbg/-data/-common packages, language modules and transitional
packages), then, where a section has more sources than the product's size, the sources with
the lowest SHA-256 of ``"datamesh-quality/" + source`` are kept. Texts are whitespace-collapsed
and trimmed to at most 600 characters (at a sentence end where one is close, else at a word).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The manifests' sources point at ROWS_URL: a placeholder host (``.invalid`` never resolves),
# to be replaced by the address of a server of this folder's rows/.
PLACEHOLDER = "http://quality-data.invalid/"
ROWS_URL = PLACEHOLDER + "rows/"
APT_LISTS = Path("/var/lib/apt/lists")
PACKAGES = APT_LISTS / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4"
TRANSLATIONS = APT_LISTS / "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en.lz4"
PYTHON = "/usr/bin/python3.11"
MAN2 = Path("/usr/share/man/man2")
MAX_TEXT = 600
SAMPLE_SALT = "datamesh-quality/"

# --------------------------------------------------------------------------- text helpers


def collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def trim(text: str, limit: int = MAX_TEXT) -> str:
    """Trim to at most ``limit`` characters, at a sentence end if one is in the last half."""
    text = collapse(text)
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    ends = [m.end() for m in re.finditer(r"[.!?:;](?=\s)", cut)]
    if ends and ends[-1] >= limit // 2:
        return cut[: ends[-1]].strip()
    space = cut.rfind(" ")
    return cut[: space if space > limit // 2 else len(cut)].rstrip(" ,;:-") + "…"


def sample_key(name: str) -> str:
    return hashlib.sha256((SAMPLE_SALT + name).encode()).hexdigest()


# --------------------------------------------------------------------------- Debian packages

SKIP_PACKAGE = re.compile(
    r"^(lib|python3?-|ruby-|node-|golang-|r-cran-|r-bioc-|php-|lua-|elpa-|gir1\.2-)"
    r"|-(dev|doc|docs|dbg|dbgsym|data|common|plugins?|l10n|locales?|tests?|examples)$"
)


def apt_cat(path: Path) -> str:
    if not path.exists():
        sys.exit(f"{path} missing: run `apt-get update -o Acquire::Languages=en` first")
    return subprocess.run(
        ["/usr/lib/apt/apt-helper", "cat-file", str(path)], check=True, capture_output=True, text=True
    ).stdout


def parse_stanzas(text: str) -> list[dict[str, str]]:
    stanzas = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Package"):
            stanzas.append(fields)
    return stanzas


def long_description(raw: str) -> str:
    """Debian long description (lines after the synopsis) as one paragraph of plain text."""
    parts = []
    for line in raw.split("\n")[1:]:
        line = line[1:] if line.startswith(" ") else line
        if line.strip() == ".":
            continue
        parts.append(line.strip())
    return collapse(" ".join(parts))


_DEBIAN_CACHE: dict[str, object] = {}


def debian_index() -> tuple[list[dict[str, str]], dict[str, str]]:
    if not _DEBIAN_CACHE:
        packages = parse_stanzas(apt_cat(PACKAGES))
        descriptions = {}
        for st in parse_stanzas(apt_cat(TRANSLATIONS)):
            if "Description-md5" in st and "Description-en" in st:
                descriptions[st["Description-md5"]] = st["Description-en"]
        _DEBIAN_CACHE["p"] = packages
        _DEBIAN_CACHE["d"] = descriptions
    return _DEBIAN_CACHE["p"], _DEBIAN_CACHE["d"]  # type: ignore[return-value]


def debian_rows(section: str, size: int) -> list[dict[str, object]]:
    packages, descriptions = debian_index()
    by_source: dict[str, list[dict[str, str]]] = {}
    for st in packages:
        name = st["Package"]
        if st.get("Section") != section or SKIP_PACKAGE.search(name):
            continue
        summary = st.get("Description", "")
        if re.search(r"transitional|transition package|dummy package|meta ?package", summary, re.I):
            continue
        source = st.get("Source", name).split()[0]
        by_source.setdefault(source, []).append(st)
    sources = sorted(by_source, key=sample_key)[:size]
    rows = []
    for source in sources:
        candidates = by_source[source]
        st = min(candidates, key=lambda s: (s["Package"] != source, len(s["Package"]), s["Package"]))
        summary = collapse(st.get("Description", ""))
        full = descriptions.get(st.get("Description-md5", ""), "")
        row: dict[str, object] = {
            "package": st["Package"],
            "summary": summary,
            "description": trim(long_description(full)) if full else summary,
            "version": st.get("Version", ""),
            "installed_size_kb": int(st.get("Installed-Size", "0") or 0),
        }
        if st.get("Homepage"):
            row["homepage"] = st["Homepage"]
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["package"]))


# --------------------------------------------------------------------------- Python stdlib

# Runs inside /usr/bin/python3.11 -I; prints a JSON list of rows.
INTROSPECT = r"""
import builtins, importlib, inspect, json, re, sys, warnings
warnings.simplefilter("ignore")
spec = json.loads(sys.argv[1])

def own_doc(obj, owner=None, name=None):
    doc = obj.__doc__ if not isinstance(obj, (classmethod, staticmethod)) else obj.__func__.__doc__
    if not isinstance(doc, str) or not doc.strip():
        return None
    if inspect.isclass(obj):
        for base in obj.__mro__[1:]:
            if base.__doc__ == doc:
                return None  # inherited, e.g. "Common base class for all non-exit exceptions."
    return inspect.cleandoc(doc)

def signature(obj):
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return re.sub(r" at 0x[0-9a-f]+>", ">", text)  # default values' reprs carry memory addresses

def kind_of(obj, in_class):
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if isinstance(obj, property):
        return "property"
    if isinstance(obj, (classmethod, staticmethod)):
        return "method"
    if in_class:
        return "coroutine method" if inspect.iscoroutinefunction(obj) else "method"
    return "coroutine function" if inspect.iscoroutinefunction(obj) else "function"

rows = []
for entry in spec["modules"]:
    modname, names, skip_classes = entry["module"], entry.get("names"), set(entry.get("skip", []))
    mod = builtins if modname == "builtins" else importlib.import_module(modname)
    if names is None:
        names = list(getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")])
    for name in sorted(set(names)):
        if name.startswith("_") or name in skip_classes:
            continue
        obj = getattr(mod, name, None)
        if obj is None or inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
            continue
        doc = own_doc(obj)
        prefix = "str" if modname == "builtins" else modname
        qual = prefix + "." + name if modname != "builtins" else name
        if doc and modname != "builtins":
            rows.append({"qualname": qual, "module": modname, "kind": kind_of(obj, False),
                         "signature": signature(obj), "doc": doc})
        if inspect.isclass(obj) and entry.get("members", True):
            for attr, value in sorted(vars(obj).items()):
                if attr.startswith("_"):
                    continue
                if inspect.isclass(value):
                    continue
                if not (callable(value) or isinstance(value, (property, classmethod, staticmethod))):
                    continue
                d = own_doc(value)
                if not d:
                    continue
                target = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
                rows.append({"qualname": qual + "." + attr, "module": modname,
                             "kind": kind_of(value, True),
                             "signature": "" if isinstance(value, property) else signature(target),
                             "doc": d})
print(json.dumps(rows))
"""

CONCURRENCY_MODULES = [
    {"module": "threading"},
    {
        "module": "multiprocessing",
        "names": [
            "Process",
            "active_children",
            "cpu_count",
            "current_process",
            "parent_process",
            "set_start_method",
            "get_start_method",
            "get_all_start_methods",
            "freeze_support",
            "log_to_stderr",
            "set_executable",
            "Pipe",
            "Manager",
        ],
    },
    {"module": "multiprocessing.process", "names": ["BaseProcess"]},
    {"module": "multiprocessing.pool", "names": ["Pool", "ThreadPool", "AsyncResult"]},
    {"module": "multiprocessing.connection", "names": ["Listener", "Client", "wait"]},
    {"module": "multiprocessing.managers", "names": ["BaseManager"]},
    {"module": "multiprocessing.shared_memory"},
    {"module": "concurrent.futures"},
    {
        "module": "asyncio",
        "skip": [
            "AbstractChildWatcher",
            "FastChildWatcher",
            "MultiLoopChildWatcher",
            "PidfdChildWatcher",
            "SafeChildWatcher",
            "ThreadedChildWatcher",
            "AbstractEventLoopPolicy",
            "DefaultEventLoopPolicy",
            "BaseEventLoop",
            "SelectorEventLoop",
            "get_child_watcher",
            "set_child_watcher",
            "BaseProtocol",
            "BufferedProtocol",
            "DatagramProtocol",
            "Protocol",
            "SubprocessProtocol",
            "StreamReaderProtocol",
            "BaseTransport",
            "DatagramTransport",
            "ReadTransport",
            "SubprocessTransport",
            "Transport",
            "WriteTransport",
            "AbstractServer",
            "Server",
            "Handle",
            "TimerHandle",
        ],
    },
    {"module": "queue"},
    {"module": "subprocess", "skip": ["list2cmdline"]},
    {"module": "sched"},
    {"module": "contextvars"},
]

STR_METHODS = sorted(n for n in vars(str) if not n.startswith("_"))

TEXT_MODULES = [
    {"module": "builtins", "names": ["str"]},
    {"module": "string"},
    {"module": "re"},
    {"module": "textwrap"},
    {"module": "difflib"},
    {"module": "unicodedata", "skip": ["UCD"]},
    {
        "module": "codecs",
        "names": [
            "encode",
            "decode",
            "lookup",
            "open",
            "EncodedFile",
            "iterencode",
            "iterdecode",
            "register",
            "unregister",
            "register_error",
            "lookup_error",
            "getencoder",
            "getdecoder",
            "getincrementalencoder",
            "getincrementaldecoder",
            "getreader",
            "getwriter",
            "strict_errors",
            "ignore_errors",
            "replace_errors",
            "xmlcharrefreplace_errors",
            "backslashreplace_errors",
            "namereplace_errors",
            "Codec",
            "IncrementalEncoder",
            "IncrementalDecoder",
            "StreamReader",
            "StreamWriter",
            "StreamReaderWriter",
            "StreamRecoder",
        ],
    },
    {"module": "html"},
    {"module": "html.parser"},
    {"module": "shlex"},
    {"module": "fnmatch"},
    {"module": "locale", "skip": ["Error"]},
    {"module": "gettext"},
    {"module": "csv"},
    {"module": "json"},
]


def python_rows(modules: list[dict]) -> list[dict[str, object]]:
    if not os.path.exists(PYTHON):
        sys.exit(f"{PYTHON} missing: apt-get install -y python3.11")
    raw = subprocess.run(
        [PYTHON, "-I", "-c", INTROSPECT, json.dumps({"modules": modules})],
        check=True,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    ).stdout
    rows, seen_docs, seen_names = [], set(), set()
    for r in json.loads(raw):
        doc = r["doc"]
        if r["qualname"] in seen_names or doc in seen_docs:
            continue  # identical docstring already present: keep the first only
        seen_names.add(r["qualname"])
        seen_docs.add(doc)
        paragraphs = [p for p in re.split(r"\n\s*\n", doc) if p.strip()]
        summary = trim(paragraphs[0], 300)
        details = trim(" ".join(paragraphs[1:])) if len(paragraphs) > 1 else ""
        row: dict[str, object] = {
            "qualname": r["qualname"],
            "module": r["module"],
            "kind": r["kind"],
        }
        if r["signature"]:
            row["signature"] = trim(r["signature"], 200)
        row["summary"] = summary
        if details:
            row["details"] = details
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["qualname"]))


# --------------------------------------------------------------------------- man pages (section 2)


def render_man(path: Path) -> str:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "MANWIDTH": "2000", "MAN_KEEP_FORMATTING": ""}
    out = subprocess.run(["man", "--nh", "--nj", "-l", str(path)], capture_output=True, env=env).stdout
    return subprocess.run(["col", "-bx"], input=out, capture_output=True, env=env).stdout.decode("utf-8", "replace")


def man_sections(text: str) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if re.match(r"^[A-Z][A-Z /-]+$", line.rstrip()):
            current = line.strip()
            sections.setdefault(current, [])
        elif current:
            sections[current].append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


def man_license(path: Path) -> str:
    """The page's licence: its SPDX line, else the man-pages project's %%%LICENSE_START tag."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as page:
        head = page.read(4000)
    m = re.search(r"SPDX-License-Identifier:\s*(\S+)", head)
    if m:
        return m.group(1)
    m = re.search(r"%%%LICENSE_START\(([^)]*)\)", head)
    return f"man-pages:{m.group(1)}" if m else "unknown"


def syscall_rows() -> list[dict[str, object]]:
    if not MAN2.exists():
        sys.exit(f"{MAN2} missing: apt-get install -y manpages-dev man-db")
    rows = []
    for path in sorted(MAN2.glob("*.2.gz")):
        if path.is_symlink():
            continue
        sections = man_sections(render_man(path))
        name_line = collapse(sections.get("NAME", ""))
        if " - " not in name_line:
            continue
        names, _, summary = name_line.partition(" - ")
        description = sections.get("DESCRIPTION", "")
        if not description.strip():
            continue
        headers = sorted(set(re.findall(r"#include <([^>]+)>", sections.get("SYNOPSIS", ""))))
        license_id = man_license(path)
        if license_id.startswith("man-pages:VERBATIM"):
            continue  # "verbatim copies" only: a trimmed excerpt would be a modified copy
        page = path.name[: -len(".2.gz")]
        row: dict[str, object] = {
            "page": page,
            "names": collapse(names),
            "summary": collapse(summary),
            "description": trim(description),
        }
        if headers:
            row["headers"] = ", ".join(headers)
        row["license"] = license_id
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- products

DEBIAN_FIELDS = [
    ("package", "string", True, "Debian binary package name."),
    ("summary", "string", False, "One-line synopsis from the package's Description field."),
    ("description", "string", False, "The package's long description (English), trimmed to 600 characters."),
    ("version", "string", False, "Package version in Debian 12 (bookworm)."),
    ("installed_size_kb", "integer", False, "Installed size in KiB, as declared by the package."),
    ("homepage", "string", False, "Upstream project home page."),
]

PYTHON_FIELDS = [
    ("qualname", "string", True, "Qualified name, e.g. module.Class.method."),
    ("module", "string", False, "Module that defines it."),
    ("kind", "string", False, "function, coroutine function, class, exception, method, coroutine method or property."),
    ("signature", "string", False, "Call signature as reported by inspect.signature, where available."),
    ("summary", "string", False, "First paragraph of the docstring."),
    ("details", "string", False, "Rest of the docstring, trimmed to 600 characters."),
]

MAN_FIELDS = [
    ("page", "string", True, "Manual page name in section 2."),
    ("names", "string", False, "System calls documented on the page (from its NAME line)."),
    ("summary", "string", False, "One-line description from the NAME line."),
    ("description", "string", False, "Start of the DESCRIPTION section, trimmed to 600 characters."),
    ("headers", "string", False, "Header files included in the SYNOPSIS."),
    (
        "license",
        "string",
        False,
        "Licence of the manual page: its SPDX identifier, or the man-pages project's licence tag.",
    ),
]

PRODUCTS = [
    {
        "name": "debian-network-tools",
        "namespace": "platform",
        "domain": "platform",
        "description": "A catalogue of networking software packaged for Debian 12: clients, servers, "
        "monitoring and diagnostic tools, VPNs and file-transfer utilities, each with the "
        "maintainers' summary and long description. Platform engineers use it to find a "
        "packaged tool for a networking job before writing one.",
        "team": "platform-engineering",
        "email": "platform-eng@example.com",
        "tags": ["debian", "networking", "packages", "tooling"],
        "fields": DEBIAN_FIELDS,
        "key": ["summary", "description"],
        "rows": lambda: debian_rows("net", 260),
        "freshness": "168h",
    },
    {
        "name": "debian-mail-software",
        "namespace": "platform",
        "domain": "platform",
        "description": "Email-related software in Debian 12, from mail transfer agents and IMAP servers to "
        "mail readers, spam filters and mailing-list managers, described by their Debian "
        "maintainers. Used by the messaging team when choosing and auditing mail components.",
        "team": "messaging-infrastructure",
        "email": "messaging-infra@example.com",
        "tags": ["debian", "email", "packages", "messaging"],
        "fields": DEBIAN_FIELDS,
        "key": ["summary", "description"],
        "rows": lambda: debian_rows("mail", 1000),
        "freshness": "168h",
    },
    {
        "name": "debian-audio-software",
        "namespace": "media",
        "domain": "media",
        "description": "Audio and music software available in Debian 12: players, editors, synthesizers, "
        "codecs, sound servers and plugins, with the package descriptions written by their "
        "maintainers. The media team uses it to pick tools for audio processing pipelines.",
        "team": "media-pipeline",
        "email": "media-pipeline@example.com",
        "tags": ["debian", "audio", "music", "packages"],
        "fields": DEBIAN_FIELDS,
        "key": ["summary", "description"],
        "rows": lambda: debian_rows("sound", 250),
        "freshness": "168h",
    },
    {
        "name": "stdlib-concurrency",
        "namespace": "python",
        "domain": "python",
        "description": "Reference entries for the concurrency parts of the Python 3.11 standard library "
        "(threads, processes, asyncio, executors, queues, subprocesses and schedulers), "
        "taken from the docstrings. Developer experience keeps it so people can look up the "
        "right primitive without leaving the mesh.",
        "team": "developer-experience",
        "email": "devex@example.com",
        "tags": ["python", "stdlib", "concurrency", "asyncio", "api-reference"],
        "fields": PYTHON_FIELDS,
        "key": ["qualname", "summary", "details"],
        "rows": lambda: python_rows(CONCURRENCY_MODULES),
        "freshness": "720h",
    },
    {
        "name": "stdlib-text-processing",
        "namespace": "python",
        "domain": "python",
        "description": "Reference entries for text handling in the Python 3.11 standard library: str "
        "methods, regular expressions, codecs, Unicode data, diffs, wrapping, shell-style "
        "splitting, HTML escaping, CSV and JSON, and localisation, from the docstrings.",
        "team": "developer-experience",
        "email": "devex@example.com",
        "tags": ["python", "stdlib", "text", "strings", "api-reference"],
        "fields": PYTHON_FIELDS,
        "key": ["qualname", "summary", "details"],
        "rows": lambda: python_rows(TEXT_MODULES),
        "freshness": "720h",
    },
    {
        "name": "syscall-manual",
        "namespace": "linux",
        "domain": "linux",
        "description": "The Linux system call manual (man-pages section 2, release 6.03): for each page the "
        "calls it documents, the one-line summary, the start of its description and the "
        "headers to include. Kernel and runtime engineers use it to find the call behind a "
        "behaviour they see.",
        "team": "kernel-runtime",
        "email": "kernel-runtime@example.com",
        "tags": ["linux", "syscalls", "man-pages", "kernel"],
        "fields": MAN_FIELDS,
        "key": ["names", "summary", "description"],
        "rows": syscall_rows,
        "freshness": "720h",
    },
]

NAMESPACES = ["platform", "media", "python", "linux"]

# --------------------------------------------------------------------------- YAML output


def scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def wrap(text: str, width: int = 96, indent: str = "    ") -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(indent + line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(indent + line)
    return "\n".join(lines)


def rows_jsonl(rows: list[dict[str, object]]) -> str:
    """The rows as JSON Lines: one object per line, fields in the order the rows give them."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def manifest(product: dict, rows: list[dict[str, object]]) -> str:
    pk = next(f[0] for f in product["fields"] if f[2])
    out = [
        "# Generated by bench/quality_data/build_products.py; do not edit by hand.",
        f"# Its rows are rows/{product['name']}.jsonl: serve rows/ and put its address in place of {PLACEHOLDER}",
        "apiVersion: datamesh.io/v1alpha1",
        "kind: DataProduct",
        "metadata:",
        f"  name: {product['name']}",
        f"  namespace: {product['namespace']}",
        "  labels:",
        "    app.kubernetes.io/part-of: datamesh-quality-bench",
        "spec:",
        f"  domain: {product['domain']}",
        "  description: >-",
        wrap(product["description"]),
        "  owner:",
        f"    team: {product['team']}",
        f"    email: {product['email']}",
        f"  tags: [{', '.join(product['tags'])}]",
        "  schema:",
        "    fields:",
    ]
    for name, typ, primary, desc in product["fields"]:
        out.append(f"      - name: {name}")
        out.append(f"        type: {typ}")
        if primary:
            out.append("        primaryKey: true")
        if name in product["key"] and not primary:
            pass
        out.append(f"        description: {scalar(desc)}")
    out += [
        "  sla:",
        f"    freshness: {product['freshness']}",
        '    availability: "99.5"',
        "    queryLatencyP99: 500ms",
        "  source:",
        "    url:",
        f"      url: {scalar(ROWS_URL + product['name'] + '.jsonl')}",
        "      format: jsonl",
        "  semanticSearch:",
        "    enabled: true",
        f"    keyFields: [{', '.join(product['key'])}]",
        "  access:",
        '    consumers: ["*"]',
        "  deletionPolicy: Delete",
    ]
    assert len({str(r[pk]) for r in rows}) == len(rows), f"duplicate primary keys in {product['name']}"
    return "\n".join(out) + "\n"


def namespaces_manifest() -> str:
    docs = []
    for ns in NAMESPACES:
        docs.append(
            f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    datamesh.io/domain: {ns}\n"
        )
    return (
        "# Generated by bench/quality_data/build_products.py. Namespaces of the benchmark's products;\n"
        "# the file name sorts first, so `kubectl apply -f products/` creates them before the products.\n"
        + "---\n".join(docs)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=HERE, help="folder of products/ and rows/ (default: this script's folder)"
    )
    parser.add_argument("--check", action="store_true", help="compare with the files in --out, write nothing")
    args = parser.parse_args()
    files = {"products/00-namespaces.yaml": namespaces_manifest()}
    for product in PRODUCTS:
        rows = product["rows"]()
        files[f"rows/{product['name']}.jsonl"] = rows_jsonl(rows)
        files[f"products/{product['name']}.yaml"] = manifest(product, rows)
        print(f"{product['namespace']}/{product['name']}: {len(rows)} rows", file=sys.stderr)
    changed = 0
    for name, text in files.items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_bytes() != text.encode("utf-8"):
                print(f"differs: {path}")
                changed += 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text.encode("utf-8"))
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
