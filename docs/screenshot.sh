#!/usr/bin/env bash
# Re-make the README's screenshots from real demo runs, with TensorBoard served on loopback and headless Chromium:
#   docs/dashboard.png    the Custom Scalars tab (the "GradGuard" section), demo without a bug (every chart has data)
#   docs/gradient_flow.png the Images tab (gradguard/gradient_flow, "Show actual image size" ticked), same clean demo
#   docs/report_text.png  the Text tab (the findings report), demo with the planted `.detach()` bug
#
#   bash docs/screenshot.sh            # needs: apt-get install -y chromium
#
# A tab that needs a click first (the Images tab's "Show actual image size") is shot by docs/screenshot.py, which
# drives the same Chromium over its DevTools pipe (standard library only).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
PY=${PYTHON:-$REPO/.venv/bin/python}
WORK=$(mktemp -d)
PORT=${PORT:-6123}
TB_PID=
trap 'if [ -n "$TB_PID" ]; then kill "$TB_PID" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT

demo() {  # demo NAME ARGS...: train examples/train.py with configs/monitoring.yaml, logs in $WORK/NAME/logs
    local name=$1
    shift
    mkdir -p "$WORK/$name"
    "$PY" examples/train.py fit --config configs/monitoring.yaml --trainer.enable_progress_bar=false \
        --trainer.default_root_dir="$WORK/$name" --trainer.logger.init_args.save_dir="$WORK/$name/logs" "$@" \
        > "$WORK/$name/train.log" 2>&1
}

shot() {  # shot LOGDIR URL_FRAGMENT OUT.png HEIGHT [TEXT_TO_CLICK]
    "$PY" -m tensorboard.main --logdir "$1" --host 127.0.0.1 --port "$PORT" > "$WORK/tb.log" 2>&1 &
    TB_PID=$!
    for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/data/runs" > /dev/null && break; sleep 1; done
    if [ -n "${5:-}" ]; then
        "$PY" docs/screenshot.py "http://127.0.0.1:$PORT/?darkMode=false#$2" "$REPO/$3" --size "1400x$4" --click "$5"
    else
        chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
            --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$WORK/chrome" \
            --window-size="1400,$4" --virtual-time-budget=20000 --screenshot="$REPO/$3" \
            "http://127.0.0.1:$PORT/?darkMode=false#$2" 2> "$WORK/chrome.log"
    fi
    kill "$TB_PID"
    wait "$TB_PID" 2>/dev/null || true
    TB_PID=
    echo "wrote $3"
}

demo clean --model.bug=none
shot "$WORK/clean/logs" custom_scalars docs/dashboard.png 1500
shot "$WORK/clean/logs" images docs/gradient_flow.png 560 "Show actual image size"

demo detach --model.bug=detach --trainer.max_steps=200
shot "$WORK/detach/logs" text docs/report_text.png 700
