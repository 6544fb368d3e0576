cd /work/main
OUT=/tmp/s12/diag
wait_up() { for i in $(seq 120); do grep -q "tandem: serving on" $1 2>/dev/null && return; sleep 1; done; }
for r in 1 2; do for j in 0 1; do
TANDEM_EXP_JITTER=$j nice -n -10 .venv/bin/tandem serve --no-chat-model --port 50101 --gateway-args="--coalesce-max-queued 64" > $OUT/serve-j$j.log 2>&1 &
S=$!; wait_up $OUT/serve-j$j.log; sleep 2
.venv/bin/python scripts/priority_bench.py --target 127.0.0.1:50101 --skip-control --unloaded-s 5 --out $OUT/j$j-r$r.json > $OUT/j$j-r$r.txt 2>&1
kill -INT $S; wait
done; done
touch $OUT/jdone
