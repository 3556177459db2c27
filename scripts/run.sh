#!/usr/bin/env bash
# Set up (if needed) and run the main job: serve the embedded default model over an
# OpenAI-compatible HTTP API (arguments go to `prefixcache serve`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/prefixcache serve "$@"
