"""Build a folder of wheels from which sedd-scale installs with no package index (an air-gapped GPU machine).

Run on a machine with package access (Python >= 3.11 and pip), naming the TARGET's Python and platform:

    python3 tools/wheelhouse.py --python 3.12 --out .whl
    # on the target: SEDD_WHEELHOUSE=.whl SEDD_PYTHON=$(which python3) bash tools/bootstrap.sh

The folder holds every wheel that pyproject.toml's dependencies need, transitively, except torch and what only torch
needs (nvidia-*, triton, sympy, ...): the target brings its own torch. During resolution torch is a placeholder wheel
of --torch-version, so that nothing is chosen that the target's torch would not satisfy; the placeholder is removed.
Packages published only as source (DeepSpeed) are built here into pure-Python wheels (DeepSpeed with DS_BUILD_OPS=0:
no C++ ops, which it compiles at run time when asked). The folder is flat, one version of each package, and at most
--max-mib in size (a checkout and its wheels then fit a 64 MiB transfer); requirements.txt in it lists them.
--torch SPEC adds a real torch (e.g. this machine's local CPU wheel, torch==2.13.0+cpu) and what only it needs, resolved
with the rest pinned, for building a whole venv offline (bootstrap.sh's venv path); those are not in the size count.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "requirements.txt"
HEADER = "# sedd-scale wheelhouse"
PLACEHOLDER = "wheelhouse.placeholder"
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"  # glibc >= 2.28, which torch 2.11's own wheels need
# This machine's pip config may name optional local indexes that do not exist; that warning is noise.
NOISE = "is ignored: it is neither a file nor a directory"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", required=True, help="the target's Python version, e.g. 3.12")
    p.add_argument("--out", required=True, type=Path, help="the folder to fill (empty, or an earlier wheelhouse)")
    p.add_argument("--platform", action="append", default=None,
                   help="the target's platform tag (repeatable); manylinux_2_N_ARCH also takes every older "
                        "manylinux tag (default: manylinux_2_28_x86_64, glibc >= 2.28 as torch 2.11 needs)")
    p.add_argument("--torch-version", default="2.11.0",
                   help="the target's torch, which the other packages must accept (default 2.11.0)")
    p.add_argument("--torch", metavar="SPEC", default=None,
                   help="also put this torch (requirement or wheel file) and what only it needs in the folder, "
                        "outside the size count (for a venv built offline)")
    p.add_argument("--max-mib", type=float, default=60.0,
                   help="fail when the wheels (--torch's not counted) exceed this many MiB (default 60)")
    args = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python):
        p.error(f"--python must be a version like 3.12, got {args.python!r}")
    return args


def platform_tags(platforms: list[str] | None) -> list[str]:
    """pip matches --platform tags exactly: a manylinux_2_N tag is expanded to every older manylinux tag too."""
    tags: list[str] = []
    for plat in platforms or [DEFAULT_PLATFORM]:
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", plat)
        if not m:
            tags.append(plat)
            continue
        newest, arch = int(m.group(1)), m.group(2)
        tags += [f"manylinux_2_{n}_{arch}" for n in range(newest, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        tags += [f"{name}_{arch}" for n, name in legacy.items() if n <= newest]
    return list(dict.fromkeys(tags))


def requirement_name(req: str) -> str:
    """The normalised project name of a requirement string ("Foo_Bar>=1" -> "foo-bar")."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise SystemExit(f"wheelhouse: cannot read a project name in the requirement {req!r}")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def wheel_name_version(path: Path) -> tuple[str, str]:
    """(normalised name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def project_requirements() -> list[str]:
    """pyproject.toml's dependencies without torch, plus what building the project itself needs."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    deps = [d for d in meta["project"]["dependencies"] if requirement_name(d) != "torch"]
    return deps + list(meta["build-system"]["requires"])


def placeholder_torch(folder: Path, version: str) -> str:
    """A dependency-free wheel named torch, so that resolution sees the target's torch without fetching it or its
    needs; returns the requirement that picks it. Its local version label is on no index: only this file matches
    (a plain 2.11.0 would lose to the index's platform-specific torch wheel of the same version)."""
    version = f"{version}+{PLACEHOLDER}"
    dist = f"torch-{version}.dist-info"
    with zipfile.ZipFile(folder / f"torch-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: sedd-scale wheelhouse\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return f"torch=={version}"


def pip(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m pip ARGS` with its output captured (pip's own noise about absent local indexes dropped)."""
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    r.stderr = "\n".join(line for line in r.stderr.splitlines() if NOISE not in line)
    return r


def fail(r: subprocess.CompletedProcess, what: str) -> NoReturn:
    """Stop with pip's last words."""
    tail = "\n".join((r.stdout + "\n" + r.stderr).strip().splitlines()[-15:])
    raise SystemExit(f"wheelhouse: {what} failed:\n{tail}")


def build_from_source(spec: str, built: Path) -> Path:
    """Build SPEC from its source here into a wheel; only a pure-Python one serves another Python or platform.
    (pip wheel picks the release by this interpreter's Python; the target's pip download then checks it again.)"""
    name = requirement_name(spec)
    print(f"[wheelhouse] building {spec} from source (no wheel on the index)", flush=True)
    # DeepSpeed: no C++ ops (they would need a torch and CUDA here; it JIT-compiles them when used). Built in
    # isolation, without torch: nothing of this machine's torch is recorded in the wheel.
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    r = pip("wheel", "--no-deps", "--no-binary=:all:", "-w", str(built), spec, env=env)
    if r.returncode:
        fail(r, f"building {spec}")
    (wheel,) = [p for p in built.glob("*.whl") if wheel_name_version(p)[0] == name]
    if not wheel.name.endswith("-none-any.whl"):
        raise SystemExit(f"wheelhouse: {spec} has no wheel for the target and builds a platform-specific one here "
                         f"({wheel.name}): build it on a machine like the target and put it in --out")
    return wheel


def prepare_out(out: Path) -> None:
    """An empty folder, or an earlier wheelhouse whose wheels are removed (never anything else's files)."""
    if out.exists() and any(out.iterdir()):
        manifest = out / MANIFEST
        if not (manifest.is_file() and manifest.read_text(encoding="utf-8").startswith(HEADER)):
            raise SystemExit(f"wheelhouse: {out} is not empty and holds no wheelhouse's {MANIFEST}: "
                             "name an empty or new folder")
        for p in out.iterdir():
            if p.suffix == ".whl" or p.name == MANIFEST:
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def resolve(args: argparse.Namespace, target: list[str], work: Path) -> None:
    """Download every wheel but torch's into --out, building from source what has none, until pip resolves the set."""
    stub, built = work / "stub", work / "built"
    stub.mkdir()
    built.mkdir()
    reqs = [*project_requirements(), placeholder_torch(stub, args.torch_version)]
    print(f"[wheelhouse] resolving for Python {args.python} on {target[target.index('--platform') + 1]}", flush=True)
    tried: set[str] = set()
    while True:
        r = pip("download", "--only-binary=:all:", *target, "--find-links", str(stub), "--find-links", str(built),
                "-d", str(args.out), *reqs)
        if r.returncode == 0:
            break
        missing = re.findall(r"No matching distribution found for (.+)", r.stderr)
        if not missing or requirement_name(missing[-1]) in tried:
            fail(r, "pip download")
        tried.add(requirement_name(missing[-1]))
        build_from_source(missing[-1].strip(), built)
    for p in args.out.glob(f"torch-*+{PLACEHOLDER}-*.whl"):
        p.unlink()


def add_torch(args: argparse.Namespace, target: list[str], work: Path, have: list[Path]) -> list[Path]:
    """--torch: that torch and what only it needs, into --out, the packages already there pinned as they are (one
    version of each); returns the wheels added."""
    pins, extra = work / "pins.txt", work / "torch"
    pins.write_text("".join(f"{n}=={v}\n" for n, v in map(wheel_name_version, have)), encoding="utf-8")
    print(f"[wheelhouse] adding {args.torch} and its dependencies", flush=True)
    r = pip("download", "--only-binary=:all:", *target, "-c", str(pins), "-d", str(extra), args.torch)
    if r.returncode:
        fail(r, f"pip download {args.torch} (with the other packages pinned as resolved)")
    names = {wheel_name_version(w)[0] for w in have}
    added = [w for w in sorted(extra.glob("*.whl")) if wheel_name_version(w)[0] not in names]
    return [Path(shutil.move(w, args.out / w.name)) for w in added]


def write_manifest(args: argparse.Namespace, wheels: list[Path], torch_wheels: list[Path]) -> None:
    """requirements.txt: what the folder holds, pinned, and how it was made."""
    torch_note = (f"torch: {args.torch}, with what only it needs: {' '.join(sorted(w.name for w in torch_wheels))}"
                  if args.torch else
                  f"torch: not included (the target's own; resolved against torch {args.torch_version})")
    lines = [f"{HEADER}, made by tools/wheelhouse.py on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"# python {args.python}", f"# platform {' '.join(args.platform or [DEFAULT_PLATFORM])}"
             " (and older manylinux tags)", f"# {torch_note}",
             "# install: SEDD_WHEELHOUSE=THIS_FOLDER bash tools/bootstrap.sh (README, 'Air-gapped / offline install'),",
             "#   or pip install --no-index --find-links THIS_FOLDER -r THIS_FOLDER/requirements.txt"]
    lines += [f"{name}=={version}" for name, version in sorted(map(wheel_name_version, wheels + torch_wheels))]
    (args.out / MANIFEST).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Build the wheelhouse; print its contents and size; fail when it is over the limit."""
    args = parse_args(argv)
    args.out = args.out.resolve()
    target = ["--python-version", args.python, "--implementation", "cp"]
    for tag in platform_tags(args.platform):
        target += ["--platform", tag]
    prepare_out(args.out)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        resolve(args, target, Path(tmp))
        wheels = sorted(args.out.glob("*.whl"))
        torch_own = [w.name for w in wheels if re.match(r"(torch|triton|nvidia)[-_]", w.name)]
        if torch_own:  # the placeholder did not stand in for torch: a bug here, not the user's
            raise SystemExit(f"wheelhouse: torch's own packages were resolved although torch is left out: {torch_own}")
        torch_wheels = add_torch(args, target, Path(tmp), wheels) if args.torch else []
    names = [wheel_name_version(w)[0] for w in wheels + torch_wheels]
    if len(set(names)) != len(names):
        raise SystemExit(f"wheelhouse: two versions of one package in {args.out}: {sorted(names)}")
    write_manifest(args, wheels, torch_wheels)
    for w in sorted(wheels, key=lambda w: -w.stat().st_size):
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    mib = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"[wheelhouse] {len(wheels)} wheels in {args.out}: {mib:.1f} MiB, limit {args.max_mib:g} MiB")
    if torch_wheels:
        torch_mib = sum(w.stat().st_size for w in torch_wheels) / 2**20
        print(f"[wheelhouse] and {len(torch_wheels)} for --torch, not counted: {torch_mib:.1f} MiB "
              f"({', '.join(w.name for w in torch_wheels)})")
    if mib > args.max_mib:
        print(f"[wheelhouse] over the limit of {args.max_mib:g} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
