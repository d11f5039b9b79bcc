#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment; prints the python to use on stdout.
#   SEDD_VENV   venv folder (default .venv)
#   SEDD_MCORE  megatron-core version (default: what pip resolves; 0.16.1 on Python 3.11)
#   SEDD_TORCH  torch requirement installed first (default torch==2.13.0, the local CPU wheel;
#               an unpinned torch would pull a multi-GB CUDA build)
#   SEDD_PYTHON an interpreter to use as it is instead of a venv (e.g. an NGC container's python with its
#               own torch, Transformer Engine and apex): checked to import what the project needs, nothing installed
#               (unless SEDD_WHEELHOUSE is set too)
#   SEDD_WHEELHOUSE a folder made by tools/wheelhouse.py: install from it alone (pip --no-index, no pip config),
#               for machines without a package index. With SEDD_PYTHON: the project (editable) and the missing
#               packages go into that interpreter, its torch pinned as it is. Without: the venv is built from the
#               folder, torch included (SEDD_TORCH default `torch`: the one the folder holds, see wheelhouse.py
#               --torch; or a torch wheel file whose dependencies the folder holds). No [test] extra either way.
# A stamp of this script + pyproject.toml + the settings makes a repeated run a no-op.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
wheelhouse=""
if [ -n "${SEDD_WHEELHOUSE:-}" ]; then
  [ -f "$SEDD_WHEELHOUSE/requirements.txt" ] || {
    echo "[bootstrap] SEDD_WHEELHOUSE=$SEDD_WHEELHOUSE holds no requirements.txt: make the folder with tools/wheelhouse.py" >&2; exit 1; }
  wheelhouse="$(cd "$SEDD_WHEELHOUSE" && pwd)"
fi

# This machine's pip config names optional local indexes that may not exist; drop that noise.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# From the wheelhouse alone: no index, and no pip config or PIP_* variable adding indexes or find-links.
pip_offline() {
  local python="$1"; shift
  env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
    "$python" -m pip install -q --disable-pip-version-check --no-index --find-links "$wheelhouse" "$@"
}
# The wheelhouse must be for this interpreter's Python (pip's own error would only say that nothing matches).
check_wheelhouse_python() {
  local want have
  want="$(sed -n 's/^# python //p' "$wheelhouse/requirements.txt")"
  have="$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [ "$want" = "$have" ] || {
    echo "[bootstrap] $wheelhouse was made for Python $want but $1 is Python $have: make one with tools/wheelhouse.py --python $have" >&2; exit 1; }
}

# Only what changes the installed set goes into the stamp (not pytest settings in pyproject.toml).
stamp_of() {  # PYTHON SETTINGS...
  local python="$1"; shift
  ("$python" -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; print(p["dependencies"], p.get("optional-dependencies"))' "$root/pyproject.toml"
   cat "$root/tools/bootstrap.sh"; echo "$*"; [ -z "$wheelhouse" ] || ls "$wheelhouse") | sha256sum | cut -c1-16
}

if [ -n "${SEDD_PYTHON:-}" ]; then
  if [ -n "$wheelhouse" ]; then
    # The stamp lives beside the packages it describes: in that interpreter's site-packages.
    stamp_file="$("$SEDD_PYTHON" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/.sedd-scale-bootstrap.stamp"
    stamp="$(stamp_of "$SEDD_PYTHON" "$SEDD_PYTHON")"
    if ! { [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; }; then
      check_wheelhouse_python "$SEDD_PYTHON"
      torch_version="$("$SEDD_PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))')" || {
        echo "[bootstrap] SEDD_PYTHON=$SEDD_PYTHON has no torch: the wheelhouse brings none for it" >&2; exit 1; }
      echo "[bootstrap] installing sedd-scale and what it lacks into $SEDD_PYTHON from $wheelhouse (torch $torch_version kept)" >&2
      pin="$(mktemp)"; echo "torch==$torch_version" > "$pin"
      pip_offline "$SEDD_PYTHON" -c "$pin" -e "$root" >&2 || { rm -f "$pin"; exit 1; }
      rm -f "$pin"
      written="$stamp"  # written once the imports below succeed
    fi
  fi
  # The project must be importable by that interpreter: installed into it (pip install -e .) or from this checkout.
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$SEDD_PYTHON" -W ignore -c 'import torch, sedd_scale.compat, megatron.core, deepspeed, webdataset, yaml, safetensors, tiktoken' >&2 || {
    echo "[bootstrap] SEDD_PYTHON=$SEDD_PYTHON cannot import what sedd-scale needs (see above): install the missing packages into it (pip install -e $root, or SEDD_WHEELHOUSE, see README), or unset SEDD_PYTHON to build .venv" >&2; exit 1; }
  [ -z "${written:-}" ] || echo "$written" > "$stamp_file"
  echo "$SEDD_PYTHON"; exit 0
fi
venv="${SEDD_VENV:-$root/.venv}"
mcore="${SEDD_MCORE:-}"
torch_req="${SEDD_TORCH:-torch==2.13.0}"
[ -z "$wheelhouse" ] || torch_req="${SEDD_TORCH:-torch}"

stamp="$(stamp_of "$py" "$mcore $torch_req")"
if [ -f "$venv/.stamp" ] && [ "$(cat "$venv/.stamp")" = "$stamp" ]; then
  echo "$venv/bin/python"; exit 0
fi

{
  echo "[bootstrap] installing into $venv (torch: $torch_req, megatron-core: ${mcore:-resolved}${wheelhouse:+, from $wheelhouse only})"
  # Updated in place (pip skips what is satisfied) so that processes using the venv keep working.
  if [ -n "$wheelhouse" ]; then  # before a venv of the wrong Python is made
    if [ -x "$venv/bin/python" ]; then check_wheelhouse_python "$venv/bin/python"; else check_wheelhouse_python "$py"; fi
  fi
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  if [ -n "$wheelhouse" ]; then
    if [ ! -f "$torch_req" ] && ! compgen -G "$wheelhouse/torch-*.whl" >/dev/null; then
      echo "[bootstrap] $wheelhouse holds no torch for the venv: make it with tools/wheelhouse.py --torch SPEC, set SEDD_TORCH to a torch wheel file, or give an interpreter that has torch as SEDD_PYTHON" >&2; exit 1
    fi
    pip=(pip_offline "$venv/bin/python")
  else
    pip=(pip_quiet "$venv/bin/python" -m pip install -q --disable-pip-version-check)
    "${pip[@]}" --upgrade pip setuptools wheel
  fi
  "${pip[@]}" "$torch_req"
  "${pip[@]}" numpy "packaging>=24.2"
  if [ -n "$mcore" ]; then
    # megatron-core >= 0.17 declares Python >= 3.12 but runs on 3.11 (see docs/platform.md).
    "${pip[@]}" --no-deps --ignore-requires-python "megatron-core==$mcore"
  fi
  if [ -n "$wheelhouse" ]; then
    # DeepSpeed is a wheel there: the project builds in isolation (setuptools from the wheelhouse). No [test] extra.
    "${pip[@]}" -e "$root"
  else
    # deepspeed is an sdist whose setup.py imports torch: build it against the torch above.
    "${pip[@]}" --no-build-isolation -e "$root[test]"
  fi
  "$venv/bin/python" -W ignore - <<'PY'
import torch, sedd_scale.compat, megatron.core, deepspeed  # noqa: F401  (fail the bootstrap, not the first job)
print(f"[bootstrap] torch {torch.__version__}, megatron-core {megatron.core.__version__}, deepspeed {deepspeed.__version__}")
PY
  echo "$stamp" > "$venv/.stamp"
} >&2
echo "$venv/bin/python"
