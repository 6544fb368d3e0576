#!/bin/bash
# A/B/C of the reserved instance: TANDEM_EXP_RESERVE 0 (today), 1 (reserve + cut short), 2 (reserve, full low calls)
cd /work/main
OUT=/tmp/s12/res
wait_up() { for i in $(seq 120); do grep -q "tandem: serving on" $1 2>/dev/null && return; sleep 1; done; }
for round in 1 2; do for v in 0 1 2; do
  TANDEM_EXP_RESERVE=$v nice -n -10 .venv/bin/tandem serve --no-chat-model --port 50101 --gateway-args="--coalesce-max-queued 64" > $OUT/serve-$v-$round.log 2>&1 &
  S=$!; wait_up $OUT/serve-$v-$round.log; sleep 2
  .venv/bin/python scripts/priority_bench.py --target 127.0.0.1:50101 --skip-control --out $OUT/v$v-r$round.json > $OUT/v$v-r$round.txt 2>&1
  kill -INT $S; wait
done; done
touch $OUT/done
