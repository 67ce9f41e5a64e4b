#!/usr/bin/env bash
# What the chat-page browser tests (tests/ui) need beyond pip packages: Debian's chromium, which Python
# Playwright drives through its bundled driver (`playwright install` is never run: no browser download).
# Idempotent and non-interactive; runs as root on Debian (or with passwordless sudo):
#
#   bash scripts/setup-ui-test.sh
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

log() { echo "[setup-ui-test] $*"; }
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else
        log "need root for: $*"; return 1; fi
}

if [ -x /usr/bin/chromium ] && /usr/bin/chromium --version >/dev/null 2>&1; then
    log "chromium: present ($(/usr/bin/chromium --version 2>/dev/null | head -n1))"
else
    log "chromium: installing from Debian"
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends chromium </dev/null
    /usr/bin/chromium --version
fi
