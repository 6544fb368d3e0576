"""Client half of scripts/container_check.sh: waits for a containerised service and checks what it serves.

    python scripts/container_probe.py wait 127.0.0.1:50051 --timeout 180 --since EPOCH --label gateway
    python scripts/container_probe.py check 127.0.0.1:50051 --metrics 9090 ...
    python scripts/container_probe.py oip 127.0.0.1:50051
    python scripts/container_probe.py generate 127.0.0.1:50051

`oip` imports tritonclient, whose own `inference` protobuf messages cannot share a process with Tandem's
tandem.oip.v2 stubs, so it runs as its own command and imports nothing of Tandem's server side.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from collections.abc import Sequence

import grpc
import numpy as np

TEXTS = ["A man is playing a guitar.", "Someone plays an acoustic guitar on stage.", "The stock market fell today."]


def wait(address: str, timeout: float, since: float, label: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    print(f"{label}: SERVING {time.time() - since:.1f} s after `podman run`")
                    return 0
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    print(f"{label}: not SERVING within {timeout:.0f} s", file=sys.stderr)
    return 1


def reference(texts: Sequence[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 straight from its package with transformers: masked mean, L2-normalised (no Tandem code)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from services.common.default_model import packaged_model_dir

    path = str(packaged_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    out: np.ndarray = torch.nn.functional.normalize(pooled, dim=1).numpy()
    return out


def check(address: str, metrics_ports: Sequence[int]) -> int:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(requests, timeout=10)
        names = {s.name for r in replies for s in r.list_services_response.service}
        missing = {
            "tandem.gateway.v1.GatewayService",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
        } - names
        if missing:
            print(f"reflection does not list {sorted(missing)}", file=sys.stderr)
            return 1
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).Embed(gateway_pb2.EmbedRequest(inputs=TEXTS), timeout=60)
    got = np.array([list(e.values) for e in reply.embeddings], dtype=np.float32)
    diff = float(np.abs(got - reference(TEXTS)).max())
    if got.shape != (len(TEXTS), 384) or diff > 1e-4:
        print(f"Embed differs from the in-process reference: shape {got.shape}, max diff {diff:.2e}", file=sys.stderr)
        return 1
    print(f"reflection ok; Embed {got.shape} matches the in-process reference (max diff {diff:.1e})")
    for port in metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        if "tandem_" not in body:
            print(f"/metrics on {port} has no tandem_ series", file=sys.stderr)
            return 1
    print(f"/metrics ok on {len(metrics_ports)} port(s)")
    return 0


def oip(address: str) -> int:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    if not (client.is_server_live() and client.is_server_ready()):
        print("OIP: server not live and ready", file=sys.stderr)
        return 1
    models = [m.name for m in client.get_model_repository_index().models]
    name = "all-MiniLM-L6-v2" if "all-MiniLM-L6-v2" in models else models[0]
    meta = client.get_model_metadata(name)
    text = grpcclient.InferInput(meta.inputs[0].name, [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_))
    result = client.infer(name, [text])
    out = result.as_numpy(meta.outputs[0].name)
    if out is None or out.shape[0] != len(TEXTS):
        print(f"OIP ModelInfer gave {None if out is None else out.shape}", file=sys.stderr)
        return 1
    client.close()
    print(f"OIP through tritonclient ok: {name} -> {meta.outputs[0].name} {out.shape}")
    return 0


def generate(address: str) -> int:
    """The built-in chat model, baked into the image: the capital question through Generate with messages,
    streamed, greedy; the answer names Paris."""
    from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from tandem.generation.v1 import generation_pb2

    stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(address))
    request = gateway_pb2.GenerateRequest(
        model="smollm2-135m-instruct",
        messages=[generation_pb2.ChatMessage(role="user", content="What is the capital of France?")],
        params=generation_pb2.GenerationParams(max_new_tokens=24),
    )
    started = time.monotonic()
    deltas = [r for r in stub.Generate(request, timeout=120)]
    text = "".join(r.text for r in deltas)
    if "Paris" not in text or deltas[-1].finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED:
        print(f"Generate answered {text!r} ({len(deltas)} messages)", file=sys.stderr)
        return 1
    print(f"Generate ok: {len(deltas)} streamed messages in {time.monotonic() - started:.1f} s: {text.strip()!r}")
    return 0


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["wait", "check", "oip", "generate"])
    parser.add_argument("address")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--since", type=float, default=0.0, help="epoch seconds the container was started at")
    parser.add_argument("--label", default="service")
    parser.add_argument("--metrics", type=int, action="append", default=[], help="a /metrics port to scrape")
    opts = parser.parse_args(argv)
    if opts.command == "wait":
        return wait(opts.address, opts.timeout, opts.since or time.time(), opts.label)
    if opts.command == "check":
        return check(opts.address, opts.metrics)
    if opts.command == "generate":
        return generate(opts.address)
    return oip(opts.address)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
