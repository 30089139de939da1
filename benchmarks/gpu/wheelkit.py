#!/usr/bin/env python3
"""The wheels that travel to the GPU machine: their list, their closure, the archive that carries them.

    python benchmarks/gpu/wheelkit.py prepare   # what benchmarks/gpu/prepare.sh runs after downloading

`wheels.txt` pins every wheel the GPU image lacks; `image.txt` names what the image holds. `prepare` checks the
downloaded wheels against both (one wheel per pin, for CPython 3.12 on manylinux x86_64, every Requires-Dist of
every wheel either carried or in the image), repacks each wheel uncompressed (ZIP_STORED: the same files, bytes and
RECORD, so pip installs it as it would the original) and packs them all into one xz tar. Deflated wheels do not
compress further; the stored ones compress by xz to about 60% of the wheels' size (pyarrow's shared libraries,
three identical copies of one of them among them). The unigrad-tiny model cache goes along, so the GPU machine
does not spend minutes pretraining it. Then it adds up what travels (the working tree and the carry folder) against
the device tool's 64 MiB.

Everything here is stdlib, except `packaging` (for Requires-Dist markers), which the GPU image has through
transformers; gpu_check.py uses the same functions there before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WHEELS_TXT = HERE / "wheels.txt"
IMAGE_TXT = HERE / "image.txt"
CARRY = HERE / "carry"  # what travels: pass "benchmarks/gpu/carry" in the device tool's carry list
DOWNLOADS = HERE / "wheels"  # prepare.sh's download folder (does not travel)
ARCHIVE = "wheels.tar.xz"
MANIFEST = "manifest.json"
CACHE = "cache"  # UNIGRAD_CACHE layout: cache/models/unigrad-tiny-<hash>/
LIMIT_BYTES = 64 * 2**20  # the device tool's limit on the working tree plus what travels with it
PYTHON = (3, 12)
# The marker environment of the GPU image (CPython 3.12, Linux x86_64), for the requirements' markers.
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.0", "implementation_name": "cpython",
              "implementation_version": "3.12.0", "platform_python_implementation": "CPython", "os_name": "posix",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
ABI_TAGS = {"cp312", "abi3", "none"}
PY_TAGS = {"cp312", "py3", "py312", "cp3"}


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path = WHEELS_TXT) -> list[tuple[str, str]]:
    """(name, version) per `name==version` line; anything else that is not a comment is an error."""
    pins, seen = [], set()
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        if not match:
            raise ValueError(f"{path.name}:{number}: {line!r} is not name==version")
        if normalize(match[1]) in seen:
            raise ValueError(f"{path.name}:{number}: {match[1]} is pinned twice")
        seen.add(normalize(match[1]))
        pins.append((match[1], match[2]))
    if not pins:
        raise ValueError(f"{path} pins nothing")
    return pins


def read_names(path: Path = IMAGE_TXT) -> set[str]:
    return {normalize(line.split("#", 1)[0].strip()) for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()}


def parse_wheel_name(filename: str) -> tuple[str, str, list[str], list[str], list[str]]:
    """(name, version, python tags, abi tags, platform tags) of a wheel file name (PEP 427)."""
    parts = filename[: -len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        raise ValueError(f"{filename} is not a wheel file name")
    name, version, py, abi, plat = parts[0], parts[1], parts[-3], parts[-2], parts[-1]
    return name, version, py.split("."), abi.split("."), plat.split(".")


def wheel_problem(filename: str) -> str | None:
    """None if the wheel installs on CPython 3.12 / Linux x86_64 (glibc new enough), else why not."""
    _, _, py, abi, plat = parse_wheel_name(filename)
    if not set(py) & PY_TAGS or not set(abi) & ABI_TAGS:
        return f"{filename}: not for CPython 3.12 (tags {'.'.join(py)}-{'.'.join(abi)})"
    if "any" not in plat and not any(p.startswith(("manylinux", "linux")) and p.endswith("x86_64") for p in plat):
        return f"{filename}: not for Linux x86_64 (platform {'.'.join(plat)})"
    return None


def glibc_needed(filename: str) -> tuple[int, int] | None:
    """The oldest glibc a manylinux wheel accepts (the lowest of its tags), None for a pure wheel."""
    versions = []
    for tag in parse_wheel_name(filename)[4]:
        if tag == "any":
            return None
        legacy = {"manylinux1_x86_64": (2, 5), "manylinux2010_x86_64": (2, 12), "manylinux2014_x86_64": (2, 17)}
        if tag in legacy:
            versions.append(legacy[tag])
        elif match := re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", tag):
            versions.append((int(match[1]), int(match[2])))
    return min(versions) if versions else None


def metadata(wheel: zipfile.ZipFile) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) from a wheel's METADATA."""
    path = next(n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
    meta = Parser().parsestr(wheel.read(path).decode("utf-8"))
    return meta["Name"], meta["Version"], meta.get_all("Requires-Dist") or []


def requirement_names(lines: list[str], env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(normalised name, requirement text) of the requirements that apply without extras in `env` (the GPU
    image's marker environment by default)."""
    from packaging.requirements import Requirement

    out = []
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env or TARGET_ENV):
            out.append((normalize(req.name), line))
    return out


def closure_problems(wheels: dict[str, list[str]], image: set[str]) -> tuple[list[str], list[str]]:
    """(problems, notes): every requirement of every carried wheel ({name: Requires-Dist}) must be carried or in
    the image; extras of a requirement (`fsspec[http]`) are noted, not followed."""
    from packaging.requirements import Requirement

    carried = {normalize(n) for n in wheels}
    problems, notes = [], []
    for name, lines in sorted(wheels.items()):
        for req_name, line in requirement_names(lines):
            if req_name not in carried and req_name not in image:
                problems.append(f"{name} requires {line!r}: neither carried (wheels.txt) nor in the image (image.txt)")
            extras = Requirement(line).extras
            if extras:
                notes.append(f"{name} requires {line!r}: the [{','.join(sorted(extras))}] extra is not carried")
    return problems, notes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_problems(wheel: zipfile.ZipFile) -> list[str]:
    """Files whose sha256 differs from the wheel's RECORD (the builder's hashes), or missing from it."""
    import base64

    record = next(n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))
    problems = []
    for row in wheel.read(record).decode("utf-8").splitlines():
        path, digest, *_ = [*row.rsplit(",", 2), "", ""]
        if not digest:  # RECORD itself, signatures
            continue
        algo, _, value = digest.partition("=")
        got = base64.urlsafe_b64encode(hashlib.new(algo, wheel.read(path)).digest()).rstrip(b"=").decode()
        if got != value:
            problems.append(f"{path}: {algo} differs from RECORD")
    return problems


def stored_copy(source: Path) -> bytes:
    """The wheel `source` rewritten uncompressed (same members, order, bytes, dates and modes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            copy.external_attr, copy.create_system = info.external_attr, info.create_system
            copy.compress_type = zipfile.ZIP_STORED
            zout.writestr(copy, zin.read(info))
    return out.getvalue()


def say(msg: str) -> None:
    print(msg, flush=True)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def tree_bytes(repo: Path) -> tuple[int, int]:
    """(files, bytes) of what the device tool copies besides the carry paths: tracked files and untracked files
    git does not ignore."""
    listing = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode().split("\0")
    files = [repo / p for p in listing if p and (repo / p).is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def verify_downloads(downloads: Path, pins: list[tuple[str, str]]) -> tuple[dict[str, Path], list[str]]:
    """{pin name: wheel file} for exactly one matching wheel per pin, and the problems found."""
    found, problems = {}, []
    files = sorted(downloads.glob("*.whl"))
    for name, version in pins:
        matches = [f for f in files if normalize(parse_wheel_name(f.name)[0]) == normalize(name)
                   and parse_wheel_name(f.name)[1] == version]
        if len(matches) != 1:
            problems.append(f"{name}=={version}: {len(matches)} wheels in {downloads} (want exactly one)")
            continue
        found[name] = matches[0]
        if problem := wheel_problem(matches[0].name):
            problems.append(problem)
    return found, problems


def check_wheels(wheels: dict[str, bytes | Path], pins: list[tuple[str, str]], image: set[str]) -> dict:
    """The checks both prepare and the GPU check run on the carried wheels ({pin name: wheel bytes or path}):
    METADATA name and version = the pin, RECORD hashes, tags, and the closure of their requirements."""
    problems, requires = [], {}
    for name, version in pins:
        source = wheels[name]
        label = source.name if isinstance(source, Path) else name
        with zipfile.ZipFile(source if isinstance(source, Path) else io.BytesIO(source)) as wheel:
            meta_name, meta_version, lines = metadata(wheel)
            if normalize(meta_name) != normalize(name) or meta_version != version:
                problems.append(f"{label}: METADATA says {meta_name}=={meta_version}, wheels.txt {name}=={version}")
            problems += [f"{label}: {p}" for p in record_problems(wheel)]
            requires[name] = lines
    closure, notes = closure_problems(requires, image)
    return {"problems": problems + closure, "notes": notes,
            "requires": {n: [line for _, line in requirement_names(v)] for n, v in requires.items()}}


def prepare(args) -> int:
    pins, image = read_pins(), read_names()
    found, problems = verify_downloads(args.downloads, pins)
    if problems:
        say("\n".join(f"error: {p}" for p in problems))
        return 1
    report = check_wheels(found, pins, image)
    for note in report["notes"]:
        say(f"note: {note}")
    if report["problems"]:
        say("\n".join(f"error: {p}" for p in report["problems"]))
        return 1
    say(f"closure: every requirement of the {len(pins)} wheels is carried or in the image (image.txt)")

    carry: Path = args.carry
    carry.mkdir(parents=True, exist_ok=True)
    entries = [{"name": name, "version": version, "file": found[name].name, "size": found[name].stat().st_size,
                "sha256": sha256_file(found[name]), "glibc_needed": glibc_needed(found[name].name)}
               for name, version in pins]
    old = json.loads((carry / MANIFEST).read_text()) if (carry / MANIFEST).is_file() else {}
    archive = carry / ARCHIVE
    same = (old.get("wheels") and [(e["file"], e["sha256"]) for e in old["wheels"]]
            == [(e["file"], e["sha256"]) for e in entries] and archive.is_file()
            and sha256_file(archive) == old.get("archive_sha256"))
    if same:
        say(f"{archive.relative_to(REPO)}: up to date")
        entries = old["wheels"]
    else:
        say(f"packing {len(entries)} wheels into {archive.relative_to(REPO)} (uncompressed wheels, xz preset "
            f"{args.preset}; a few minutes)")
        tmp = archive.with_suffix(".tmp")
        with tarfile.open(tmp, "w:xz", preset=args.preset) as tar:
            for entry in entries:
                data = stored_copy(found[entry["name"]])
                with zipfile.ZipFile(io.BytesIO(data)) as a, zipfile.ZipFile(found[entry["name"]]) as b:
                    assert [(i.filename, i.CRC) for i in a.infolist()] == [(i.filename, i.CRC) for i in b.infolist()]
                entry["stored_sha256"], entry["stored_size"] = sha256_bytes(data), len(data)
                info = tarfile.TarInfo(entry["file"])
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, archive)

    # The tiny model the training stage needs, built here if this machine has not built it yet.
    say("unigrad-tiny: locating (building if needed) the cached default model")
    built = subprocess.run([sys.executable, "-c", "from unigrad.models import ensure_tiny; print(ensure_tiny())"],
                           capture_output=True, text=True, cwd=REPO)
    if built.returncode:
        say(built.stderr[-3000:])
        return 1
    tiny = Path(built.stdout.strip().splitlines()[-1])
    target = carry / CACHE / "models" / tiny.name
    if target.parent.exists():
        shutil.rmtree(target.parent)
    shutil.copytree(tiny, target)

    manifest = {"python": ".".join(map(str, PYTHON)), "platform": "manylinux x86_64", "wheels": entries,
                "archive": ARCHIVE, "archive_size": archive.stat().st_size, "archive_sha256": sha256_file(archive),
                "tiny_model": f"{CACHE}/models/{tiny.name}", "requires": report["requires"], "notes": report["notes"]}
    (carry / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    say("\nwheel                                            size")
    for e in entries:
        say(f"  {e['name'] + '==' + e['version']:<44} {mib(e['size']):>10}")
    wheels_total = sum(e["size"] for e in entries)
    say(f"  {'total (' + str(len(entries)) + ' wheels as downloaded)':<44} {mib(wheels_total):>10}")
    files, tree = tree_bytes(REPO)
    carried = folder_bytes(carry)
    total = tree + carried
    say(f"\n{ARCHIVE} {mib(manifest['archive_size'])} (stored wheels {mib(sum(e['stored_size'] for e in entries))} "
        f"under xz); tiny model {mib(folder_bytes(target))}; carry folder {mib(carried)}")
    say(f"working tree {mib(tree)} ({files} files) + carry folder {mib(carried)} = {mib(total)} "
        f"of {mib(LIMIT_BYTES)}")
    if total > LIMIT_BYTES:
        say("error: over the device tool's limit")
        return 1
    say(f"ok: pass carry=[\"{carry.relative_to(REPO)}\"] and run `bash benchmarks/gpu/check.sh` there")
    return 0


def unpack(carry: Path, dest: Path) -> tuple[dict, dict[str, Path], list[str]]:
    """(manifest, {pin name: stored wheel file in dest}, problems): the archive checked against its manifest and
    wheels.txt, unpacked into `dest`, each wheel checked against its sha256."""
    manifest = json.loads((carry / MANIFEST).read_text())
    problems = []
    pins = read_pins()
    listed = [(e["name"], e["version"]) for e in manifest["wheels"]]
    if [(normalize(n), v) for n, v in listed] != [(normalize(n), v) for n, v in pins]:
        problems.append(f"{MANIFEST} lists {listed}, wheels.txt pins {pins}: rerun benchmarks/gpu/prepare.sh")
    archive = carry / manifest["archive"]
    if sha256_file(archive) != manifest["archive_sha256"]:
        problems.append(f"{archive.name}: sha256 differs from {MANIFEST}")
        return manifest, {}, problems
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or "/" in member.name or member.name.startswith("."):
                problems.append(f"{archive.name}: unexpected member {member.name!r}")
                continue
            (dest / member.name).write_bytes(tar.extractfile(member).read())
    files = {}
    for e in manifest["wheels"]:
        path = dest / e["file"]
        if not path.is_file():
            problems.append(f"{e['file']}: not in {archive.name}")
        elif sha256_file(path) != e["stored_sha256"]:
            problems.append(f"{e['file']}: sha256 differs from {MANIFEST}")
        else:
            files[e["name"]] = path
    return manifest, files, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="check the downloaded wheels, pack them and the tiny model, add up sizes")
    p.add_argument("--downloads", type=Path, default=DOWNLOADS)
    p.add_argument("--carry", type=Path, default=CARRY)
    p.add_argument("--preset", type=int, default=9, help="xz preset (0-9)")
    sub.add_parser("pins", help="print wheels.txt as pip requirement lines")
    args = ap.parse_args(argv)
    if args.command == "pins":
        print("\n".join(f"{n}=={v}" for n, v in read_pins()))
        return 0
    return prepare(args)


if __name__ == "__main__":
    sys.exit(main())
