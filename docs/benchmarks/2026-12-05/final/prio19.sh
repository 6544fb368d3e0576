#!/bin/bash
# priority under load: separate shape with the crowd at nice 0 and 19; in-process shape with the crowd at nice 19
cd /work/main
OUT=${1:-/tmp/m/prio2}
mkdir -p $OUT
wait_up() { for i in $(seq 120); do .venv/bin/python -c "
import grpc,sys
from grpc_health.v1 import health_pb2, health_pb2_grpc
s=health_pb2_grpc.HealthStub(grpc.insecure_channel('127.0.0.1:$1'))
sys.exit(0 if s.Check(health_pb2.HealthCheckRequest(),timeout=1).status==1 else 1)" 2>/dev/null && return; sleep 1; done; }
nice -n -10 .venv/bin/tandem serve --no-chat-model --port 50101 --gateway-args="--coalesce-max-queued 64" > $OUT/serve-50101.log 2>&1 &
S=$!; wait_up 50101; uptime > $OUT/load.txt
.venv/bin/python scripts/priority_bench.py --target 127.0.0.1:50101 --crowd-nice 19 --skip-control --out $OUT/separate-nice19.json > $OUT/separate-nice19.txt 2>&1
uptime >> $OUT/load.txt
kill -INT $S; wait
nice -n -10 .venv/bin/tandem serve --no-chat-model --port 50102 --in-process tokenizer,postprocess --gateway-args="--coalesce-max-queued 64" > $OUT/serve-50102.log 2>&1 &
S=$!; wait_up 50102
.venv/bin/python scripts/priority_bench.py --target 127.0.0.1:50102 --crowd-nice 19 --skip-control --out $OUT/inprocess-nice19.json > $OUT/inprocess-nice19.txt 2>&1
uptime >> $OUT/load.txt
kill -INT $S; wait
for f in $OUT/*.json; do echo $f; python3 -c "
import json,sys; r=json.load(open('$f')); p=r['phases']
for n,ph in p.items():
  for c in ('high','low'):
    if c in ph: x=ph[c]; print(n,c,x['answers_per_s'],x['refused'],x['p50_ms'],x['p90_ms'],x['p99_ms'],x['callers_answered'],x['fewest_answers_of_a_caller'],x.get('client_cpu_cores'))
print('ratio',r['high_p50_loaded_over_unloaded'])"; done
