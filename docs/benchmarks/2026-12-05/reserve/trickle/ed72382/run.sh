cd /work/main
OUT=/tmp/s12/trickle
mkdir -p $OUT
wait_up() { for i in $(seq 120); do grep -q "tandem: serving on" $1 2>/dev/null && return; sleep 1; done; }
.venv/bin/tandem serve --no-chat-model --port 50071 --model-repository /tmp/s12/repo-on > $OUT/serve-on.log 2>&1 &
A=$!
.venv/bin/tandem serve --no-chat-model --port 50072 --model-repository /tmp/s12/repo-off > $OUT/serve-off.log 2>&1 &
B=$!
wait_up $OUT/serve-on.log; wait_up $OUT/serve-off.log; sleep 2
T=kept=127.0.0.1:50071,off=127.0.0.1:50072
uptime > $OUT/load.txt
.venv/bin/python docs/benchmarks/2026-12-05/reserve/trickle/trickle.py $T 32 1 0.5 20 3 > $OUT/c32x1-trickle.jsonl 2>&1
.venv/bin/python docs/benchmarks/2026-12-05/reserve/trickle/trickle.py $T 4 32 0.5 20 3 > $OUT/c4x32-trickle.jsonl 2>&1
.venv/bin/python docs/benchmarks/2026-12-05/reserve/trickle/trickle.py $T 32 1 0 20 1 > $OUT/c32x1-none.jsonl 2>&1
uptime >> $OUT/load.txt
kill -INT $A $B; wait
touch $OUT/done
