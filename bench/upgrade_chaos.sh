#!/bin/bash
# Upgrades under fire: nginx (fastcgi_pass, keepalive 32) in front of anteroom (demo app, 4 workers), GETs and
# POSTs from oha for 20 s, an upgrade (SIGUSR2) every 3 s and a random worker SIGKILLed every 400 ms.
# Expected: every GET 200; the only failures are POSTs that were at a killed worker (502, each logged by
# anteroom with its request id: "worker died ... request=\"POST"). Each new process logs how many
# kept-alive connections it took over ("adopted=N").
#
#   bench/upgrade_chaos.sh [path/to/anteroom]     (root not needed; needs nginx and oha)
set -euo pipefail
BIN=$(realpath "${1:-target/release/anteroom}")
DIR=$(mktemp -d /tmp/anteroom-chaos.XXXXXX)
PORT=${PORT:-18777}
ulimit -n 20000 2>/dev/null || true
cp "$BIN" "$DIR/anteroom"   # an upgrade starts the file on disk: a private copy
mkdir -p "$DIR/ng"
cat > "$DIR/ng/nginx.conf" <<CONF
daemon off; master_process off; worker_processes 1; error_log $DIR/ng/error.log info; pid $DIR/ng/nginx.pid;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $DIR/ng/body; proxy_temp_path $DIR/ng/p; fastcgi_temp_path $DIR/ng/f;
 uwsgi_temp_path $DIR/ng/u; scgi_temp_path $DIR/ng/s;
 upstream ant { server unix:$DIR/fcgi.sock; keepalive 32; }
 server { listen 127.0.0.1:$PORT;
  location / { include /etc/nginx/fastcgi_params; fastcgi_keep_conn on; fastcgi_pass ant; } } }
CONF
ANTEROOM_LOG=info "$DIR/anteroom" --listen-fastcgi "unix:$DIR/fcgi.sock" --admin off --workers 4 \
    --max-queue 10000 2> "$DIR/anteroom.log" &
sleep 1.5
nginx -p "$DIR/ng" -c "$DIR/ng/nginx.conf" &
NGINX=$!
trap 'kill $NGINX 2>/dev/null; pkill -f "$DIR/anteroom" 2>/dev/null || true' EXIT
sleep 0.5
URL="http://127.0.0.1:$PORT/sleep?ms=5"
oha -z 20s -c 30 --no-tui --output-format json -w "$URL" > "$DIR/gets.json" &
GETS=$!
oha -z 20s -c 10 --no-tui --output-format json -w -m POST -T application/octet-stream -d "$(printf 'x%.0s' {1..64})" \
    "$URL" > "$DIR/posts.json" &
POSTS=$!
end=$((SECONDS + 19)); last=$SECONDS; upgrades=0; kills=0
while [ $SECONDS -lt $end ]; do
  sleep 0.4
  victim=$(pgrep -f "$DIR/anteroom demo-worker" | shuf -n1 || true)
  if [ -n "$victim" ]; then kill -9 "$victim" 2>/dev/null && kills=$((kills + 1)) || true; fi
  if [ $((SECONDS - last)) -ge 3 ]; then
    kill -USR2 "$(pgrep -f "$DIR/anteroom --listen-fastcgi" | tail -1)"; last=$SECONDS; upgrades=$((upgrades + 1))
  fi
done
wait $GETS $POSTS
python3 - "$DIR" "$upgrades" "$kills" <<'PY'
import json, re, sys
d, upgrades, kills = sys.argv[1], sys.argv[2], sys.argv[3]
log = open(f"{d}/anteroom.log").read()
for n in ("gets", "posts"):
    r = json.load(open(f"{d}/{n}.json"))
    print(f"{n}: status {r.get('statusCodeDistribution')} errors {r.get('errorDistribution')}")
posts_killed = len(re.findall(r"worker died .*request=.POST", log))
adopted = re.findall(r"adopted=(\d+)", log)
print(f"upgrades {upgrades}, workers killed {kills}, POSTs at a killed worker {posts_killed}, "
      f"adopted per upgrade {adopted}")
PY
echo "logs in $DIR"
