#!/bin/bash
# session 9 final measurements: both shapes of tandem serve, bench 1x1 (9 rounds), 32x1 + 4x32 (3 rounds); priority runs
cd /work/main
OUT=${1:-/tmp/m10/final}
mkdir -p $OUT
wait_up() { for i in $(seq 120); do .venv/bin/python -c "
import grpc,sys
from grpc_health.v1 import health_pb2, health_pb2_grpc
s=health_pb2_grpc.HealthStub(grpc.insecure_channel('127.0.0.1:$1'))
sys.exit(0 if s.Check(health_pb2.HealthCheckRequest(),timeout=1).status==1 else 1)" 2>/dev/null && return; sleep 1; done; }
uptime > $OUT/load.txt
.venv/bin/tandem serve --no-chat-model --port 50061 > $OUT/serve-sep.log 2>&1 &
A=$!
.venv/bin/tandem serve --no-chat-model --port 50062 --in-process tokenizer,postprocess > $OUT/serve-inp.log 2>&1 &
B=$!
wait_up 50061; wait_up 50062
T=separate=127.0.0.1:50061,in-process=127.0.0.1:50062
nice -n -10 .venv/bin/tandem bench --target $T --concurrency 1 --texts-per-request 1 --texts-per-cell 1024 --rounds 9 --out $OUT/c1 > $OUT/c1.txt 2>&1
uptime >> $OUT/load.txt
nice -n -10 .venv/bin/tandem bench --target $T --concurrency 32 --texts-per-request 1 --texts-per-cell 1024 --rounds 3 --out $OUT/c32 > $OUT/c32.txt 2>&1
uptime >> $OUT/load.txt
nice -n -10 .venv/bin/tandem bench --target $T --concurrency 4 --texts-per-request 32 --texts-per-cell 2048 --rounds 3 --out $OUT/c4x32 > $OUT/c4x32.txt 2>&1
uptime >> $OUT/load.txt
kill -INT $A $B; wait
touch $OUT/done; exit 0
nice -n -10 .venv/bin/tandem serve --no-chat-model --port 50101 --gateway-args="--coalesce-max-queued 64" > $OUT/prio/serve-sep0.log 2>&1 &
S=$!; wait_up 50101
.venv/bin/python scripts/priority_bench.py --target 127.0.0.1:50101 --out $OUT/prio/separate-nice0.json > $OUT/prio/separate-nice0.txt 2>&1
uptime >> $OUT/load.txt
kill -INT $S; wait
touch $OUT/done
