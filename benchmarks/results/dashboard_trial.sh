set -x
export HYBRID_DATA_DIR=/tmp/dash/data
cd /tmp/dash
git -C /work/main rev-parse HEAD
hybrid prepare --profile test
hybrid run --method hybrid --study h --profile test --trials 8 --mutate-every 2 --stagnation 2
hybrid dashboard --port 8093 &
DASH=$!
sleep 8
chromium --version
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1440,1400 \
  --virtual-time-budget=15000 --screenshot=/tmp/dash/dashboard_trial.png \
  'http://127.0.0.1:8093/dashboard/studies/1/trials?numbers=5'
curl -s http://127.0.0.1:8093/api/studies/1 | head -c 600; echo
kill $DASH
