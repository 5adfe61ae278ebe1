#!/usr/bin/env bash
# Sourced by run.sh and test.sh: installs the Debian packages fastproxy needs to build
# (and, with TEST_PACKAGES=1, to test), creates .venv and installs fastproxy into it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(python3-venv python3-dev gcc)
if [ "${TEST_PACKAGES:-0}" = 1 ]; then
  packages+=(wrk nginx haproxy curl procps)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # nginx and haproxy are only benchmark peers: keep their packaged services from starting
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --upgrade pip
if [ -n "${EXTRAS:-}" ]; then
  .venv/bin/pip install -q -e ".[$EXTRAS]"
else
  .venv/bin/pip install -q -e .
fi
