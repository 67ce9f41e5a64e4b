#!/usr/bin/env bash
# Prepares everything the project needs beyond pip packages (system tools, converted expert models).
# Idempotent; runs as root on a fresh Debian machine with no stdin.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -f "$here/setup-experts.sh" ]; then
  bash "$here/setup-experts.sh"
fi
