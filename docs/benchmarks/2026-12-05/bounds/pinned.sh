#!/bin/bash
# The pipeline on CPU 0 (gateway, light stages, bench client, the bare model between cells), the inference stage's
# process on CPU 1 with one model thread: Tandem against the model alone on one core.
cd /work/main
OUT=${1:-/tmp/m10/pinned}
mkdir -p $OUT
wait_up() { for i in $(seq 120); do .venv/bin/python -c "
import grpc,sys
from grpc_health.v1 import health_pb2, health_pb2_grpc
s=health_pb2_grpc.HealthStub(grpc.insecure_channel('127.0.0.1:$1'))
sys.exit(0 if s.Check(health_pb2.HealthCheckRequest(),timeout=1).status==1 else 1)" 2>/dev/null && return; sleep 1; done; }
uptime > $OUT/load.txt
IA='--inference-args=--intra-op-threads 1 --model-instances 1'
taskset -c 0 .venv/bin/tandem serve --no-chat-model --port 50071 "$IA" > $OUT/serve-sep.log 2>&1 &
A=$!
taskset -c 0 .venv/bin/tandem serve --no-chat-model --port 50072 --in-process tokenizer,postprocess "$IA" > $OUT/serve-inp.log 2>&1 &
B=$!
wait_up 50071; wait_up 50072
for P in $A $B; do
  for I in $(pgrep -f "services.inference .*--parent-pid $P"); do taskset -a -p -c 1 $I; done
done
ps -eLo pid,tid,psr,comm | awk 'NR==1 || /python/' > $OUT/threads.txt
T=separate=127.0.0.1:50071,in-process=127.0.0.1:50072
taskset -c 0 nice -n -10 .venv/bin/tandem bench --target $T --threads 1 --concurrency 1,32 --texts-per-request 1 --texts-per-cell 1024 --rounds 3 --out $OUT/c32 > $OUT/c32.txt 2>&1
uptime >> $OUT/load.txt
taskset -c 0 nice -n -10 .venv/bin/tandem bench --target $T --threads 1 --concurrency 4 --texts-per-request 32 --texts-per-cell 1024 --rounds 3 --out $OUT/c4x32 > $OUT/c4x32.txt 2>&1
uptime >> $OUT/load.txt
kill -INT $A $B; wait
touch $OUT/done
