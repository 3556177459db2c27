#!/usr/bin/env bash
# Set up (if needed) and run the main job: generate text with the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/prefixcache generate "$@"
