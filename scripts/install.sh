#!/bin/sh
# The one install procedure of tts-streamer: the Makefile's .venv (so CI runs it) and the Dockerfile's
# builder stage both call this script, so a step missing here fails `make test` before it fails an image.
#
#   scripts/install.sh [--dev] [--editable] VENV_DIR [PROJECT_DIR]
#
#   --dev        also install the `dev` extras (pytest, ruff, mypy, linters, and the Piper voice)
#   --editable   install the project in editable mode (development; never in an image)
#   VENV_DIR     created if missing (an existing venv is updated in place)
#   PROJECT_DIR  the directory holding pyproject.toml (default: this script's parent directory)
#
# Needs only python3 (3.11-3.13): $PYTHON names another interpreter. pip's own environment variables
# apply (PIP_NO_CACHE_DIR, PIP_INDEX_URL, PIP_CONSTRAINT, ...). After installing, every module of the
# package is imported and the embedded espeak-ng library is loaded, so a missing runtime dependency or
# a wheel without its voice data fails here, not in production.
set -eu

usage() {
    sed -n '5,10p' "$0" | sed 's/^# \{0,1\}//'
}

dev=0
editable=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dev) dev=1 ;;
        --editable) editable=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        --)
            shift
            break
            ;;
        -*)
            echo "install.sh: unknown option $1" >&2
            usage >&2
            exit 2
            ;;
        *) break ;;
    esac
    shift
done
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    usage >&2
    exit 2
fi

venv=$1
project=${2:-$(cd "$(dirname "$0")/.." && pwd)}
python=${PYTHON:-python3}

if [ ! -f "$project/pyproject.toml" ]; then
    echo "install.sh: no pyproject.toml in $project" >&2
    exit 2
fi

spec=$project
if [ "$dev" = 1 ]; then
    spec="$project[dev]"
fi

echo "install.sh: $venv <- $spec (editable=$editable) with $("$python" --version 2>&1)"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
if [ "$editable" = 1 ]; then
    "$venv/bin/python" -m pip install --quiet --editable "$spec"
else
    "$venv/bin/python" -m pip install --quiet "$spec"
fi

# Smoke check: every module imports, the console script exists, the offline voice is loadable
# (with --dev, the Piper voice too, so its tests run rather than skip).
TTS_INSTALL_DEV=$dev "$venv/bin/python" - <<'EOF'
import ctypes
import importlib
import os
import pkgutil
import sys

import espeakng_loader

import tts_streamer

failed = []
modules = 0
for info in pkgutil.walk_packages(tts_streamer.__path__, "tts_streamer."):
    modules += 1
    try:
        importlib.import_module(info.name)
    except Exception as exc:  # report them all, then fail
        failed.append(f"{info.name}: {type(exc).__name__}: {exc}")
if failed:
    sys.exit("install.sh: modules that do not import:\n  " + "\n  ".join(failed))

ctypes.CDLL(espeakng_loader.get_library_path())
data = espeakng_loader.get_data_path()
missing = [name for name in ("phontab", "phondata", "phonindex", "en_dict") if not os.path.isfile(os.path.join(data, name))]
if missing:
    sys.exit(f"install.sh: espeak-ng voice data incomplete in {data}: missing {missing}")

if os.environ.get("TTS_INSTALL_DEV") == "1":
    from tts_streamer.adapters.piper_model import default_model_paths, piper_unavailable_reason

    reason = piper_unavailable_reason()
    if reason is not None:
        sys.exit(f"install.sh: the dev install needs the Piper voice: {reason}")
    absent = [path for path in default_model_paths() if not os.path.isfile(path)]
    if absent:
        sys.exit(f"install.sh: Piper voice files missing: {absent}")

script = os.path.join(os.path.dirname(sys.executable), "tts-streamer")
if not os.access(script, os.X_OK):
    sys.exit(f"install.sh: console script missing at {script}")
print(f"install.sh: ok, {modules} modules import, espeak-ng loads, {script}")
EOF
