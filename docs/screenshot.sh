#!/usr/bin/env bash
# Re-make docs/dashboard.png: train the demo with configs/monitoring.yaml, serve its logs with TensorBoard on
# loopback, and photograph the Custom Scalars tab (the "GradGuard" section) with headless Chromium.
#
#   bash docs/screenshot.sh            # needs: apt-get install -y chromium
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d)
PORT=${PORT:-6123}
trap 'kill "${TB_PID:-0}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

# 1. The demo run (no planted bug, so that every chart has data): ~2000 steps, logged every 50.
(cd "$WORK" && "$OLDPWD/$PY" "$OLDPWD/examples/train.py" fit --config "$OLDPWD/configs/monitoring.yaml" \
    --model.bug=none --trainer.enable_progress_bar=false > "$WORK/train.log" 2>&1)
LOGDIR="$WORK/lightning_logs/monitoring"

# 2. TensorBoard on loopback only.
"$PY" -m tensorboard.main --logdir "$LOGDIR" --host 127.0.0.1 --port "$PORT" > "$WORK/tb.log" 2>&1 &
TB_PID=$!
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/data/runs" > /dev/null && break; sleep 1; done

# 3. The Custom Scalars tab, once its charts have loaded.
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$WORK/chrome" \
    --window-size=1400,1500 --virtual-time-budget=20000 --screenshot="$PWD/docs/dashboard.png" \
    "http://127.0.0.1:$PORT/?darkMode=false#custom_scalars" 2> "$WORK/chrome.log"
echo "wrote docs/dashboard.png"
