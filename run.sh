#!/usr/bin/env bash
# Install fastproxy into .venv and run it in the foreground on conf/fastproxy.toml
# (or on the config file given as the first argument).
set -euo pipefail
cd "$(dirname "$0")"
EXTRAS="" source scripts/setup-env.sh
exec .venv/bin/fastproxy -c "${1:-conf/fastproxy.toml}"
