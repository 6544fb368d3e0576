#!/bin/bash
cd /work/main
OUT=${1:-/tmp/m10/ab2}
mkdir -p $OUT
wait_up() { for i in $(seq 120); do .venv/bin/python -c "
import grpc,sys
from grpc_health.v1 import health_pb2, health_pb2_grpc
s=health_pb2_grpc.HealthStub(grpc.insecure_channel('127.0.0.1:$1'))
sys.exit(0 if s.Check(health_pb2.HealthCheckRequest(),timeout=1).status==1 else 1)" 2>/dev/null && return; sleep 1; done; }
uptime > $OUT/load.txt
R="--no-chat-model --in-process tokenizer,postprocess"
.venv/bin/tandem serve $R --port 50061 --inference-args="--inline-lone-ms 0" > $OUT/serve-off.log 2>&1 &
A=$!
.venv/bin/tandem serve $R --port 50062 > $OUT/serve-on.log 2>&1 &
B=$!
wait_up 50061; wait_up 50062
T=executor=127.0.0.1:50061,inline=127.0.0.1:50062
nice -n -10 .venv/bin/tandem bench --target $T --concurrency 1 --texts-per-request 1 --texts-per-cell 1024 --rounds 5 --skip-bare --out $OUT/minilm-c1 > $OUT/minilm-c1.txt 2>&1
nice -n -10 .venv/bin/tandem bench --target $T --concurrency 4,32 --texts-per-request 1 --texts-per-cell 1024 --rounds 3 --skip-bare --out $OUT/minilm-c4-32 > $OUT/minilm-c4-32.txt 2>&1
uptime >> $OUT/load.txt
kill -INT $A $B; wait
R="--no-chat-model --model-repository /tmp/m10/bertrepo --in-process tokenizer,postprocess"
.venv/bin/tandem serve $R --port 50071 --inference-args="--inline-lone-ms 0" > $OUT/serve-bert-off.log 2>&1 &
A=$!
.venv/bin/tandem serve $R --port 50072 > $OUT/serve-bert-on.log 2>&1 &
B=$!
wait_up 50071; wait_up 50072
T=executor=127.0.0.1:50071,inline=127.0.0.1:50072
nice -n -10 .venv/bin/tandem bench --target $T --model bert-base --model-repository /tmp/m10/bertrepo --concurrency 1,4 --texts-per-request 1 --texts-per-cell 512 --rounds 3 --skip-bare --out $OUT/bert > $OUT/bert.txt 2>&1
uptime >> $OUT/load.txt
kill -INT $A $B; wait
touch $OUT/done
