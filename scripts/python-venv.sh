#!/usr/bin/env bash
# Makes a Python venv from a pinned requirements file, once: `scripts/python-venv.sh VENV REQUIREMENTS`.
# The venv keeps the hash of the file it was made from, so changing a pin remakes it and an
# unchanged one costs nothing. Shared by the scripts that run Python test clients.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 VENV REQUIREMENTS" >&2
  exit 2
fi
VENV=$1
REQUIREMENTS=$2
WANT=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
HAVE=$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)
if [ "$HAVE" = "$WANT" ] && "$VENV/bin/python" -c '' 2>/dev/null; then
  exit 0
fi
echo "== making $VENV from $REQUIREMENTS"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQUIREMENTS"
echo "$WANT" >"$VENV/.requirements.sha256"
