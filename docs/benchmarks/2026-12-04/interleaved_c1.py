"""Concurrency 1, interleaved: bare generate() prefill and per-token time, then one request through a running
gateway (127.0.0.1:50071, model `smollm2`), three rounds, so that the machine's drift hits both alike."""

import itertools
import statistics
import time

import grpc
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.generation.v1 import generation_pb2

torch.set_num_threads(1)
PATH = "/tmp/smolrepo/smollm2/1"
QUESTION = "Tell me a long story about a cat and a dog who live in a small house near the sea."
tokenizer = AutoTokenizer.from_pretrained(PATH)
model = AutoModelForCausalLM.from_pretrained(PATH).eval()
model.generation_config.eos_token_id = None
text = tokenizer.apply_chat_template(
    [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
)
ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel("127.0.0.1:50071"))


def bare(new_tokens: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return time.perf_counter() - started


def served() -> tuple[float, float]:
    started = time.perf_counter()
    arrivals = []
    request = gateway_pb2.GenerateRequest(
        model="smollm2",
        messages=[generation_pb2.ChatMessage(role="user", content=QUESTION)],
        params=generation_pb2.GenerationParams(max_new_tokens=48, ignore_eos=True),
    )
    for response in stub.Generate(request):
        if response.token_ids:
            arrivals.append((time.perf_counter(), len(response.token_ids)))
    gaps = [(b[0] - a[0]) / b[1] for a, b in itertools.pairwise(arrivals)]
    return arrivals[0][0] - started, statistics.median(gaps)


for round_ in range(3):
    one, many = bare(1), bare(48)
    ttft, itl = served()
    print(
        f"round {round_}: bare prefill {one * 1e3:.1f} per-token {(many - one) / 47 * 1e3:.2f}"
        f" | served TTFT {ttft * 1e3:.1f} ITL p50 {itl * 1e3:.2f}",
        flush=True,
    )
