#!/usr/bin/env bash
# Re-make the README's screenshots from a real demo run, with TensorBoard served on loopback and headless Chromium.
# The run: examples/train.py with configs/monitoring.yaml (every finding warns; logged every 50 steps, update ratios
# on) and the planted `.detach()` (`--model.bug=detach`: the encoder gets no gradient), 2000 steps.
#   docs/dashboard.png      the Custom Scalars tab (the "GradGuard" section)
#   docs/scalars.png        the Scalars tab, tags filtered to `no_grad|findings`
#   docs/gradient_flow.png  the Images tab at TensorBoard's default image size (gradguard/gradient_flow)
#   docs/report_text.png    the Text tab (the findings report)
#
#   bash docs/screenshot.sh            # needs: apt-get install -y chromium
#
# docs/screenshot.py drives Chromium over its DevTools pipe (standard library only) and waits for the page to load.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
PY=${PYTHON:-$REPO/.venv/bin/python}
WORK=$(mktemp -d)
PORT=${PORT:-6123}
TB_PID=
trap 'if [ -n "$TB_PID" ]; then kill "$TB_PID" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT

"$PY" examples/train.py fit --config configs/monitoring.yaml --model.bug=detach --trainer.enable_progress_bar=false \
    --trainer.default_root_dir="$WORK" --trainer.logger.init_args.save_dir="$WORK/logs" > "$WORK/train.log" 2>&1

"$PY" -m tensorboard.main --logdir "$WORK/logs" --host 127.0.0.1 --port "$PORT" > "$WORK/tb.log" 2>&1 &
TB_PID=$!
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/data/runs" > /dev/null && break; sleep 1; done

shot() {  # shot URL_FRAGMENT OUT.png HEIGHT
    "$PY" docs/screenshot.py "http://127.0.0.1:$PORT/?darkMode=false#$1" "$REPO/$2" --size "1400x$3"
}
shot custom_scalars docs/dashboard.png 1420
shot "scalars&tagFilter=no_grad%7Cfindings" docs/scalars.png 480
shot images docs/gradient_flow.png 600
shot text docs/report_text.png 520
