"""Settings of the inference stage: flags, or TANDEM_INFERENCE_* environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_INFERENCE_")

    listen: str = Field("127.0.0.1:50053", description="address to serve on: HOST:PORT or unix:PATH")
    intra_op_threads: int | None = Field(
        None,
        ge=1,
        description="threads inside one model call (ONNX Runtime and torch); default: the CPUs this process may use "
        "(affinity and container CPU quota)",
    )
    intra_op_spinning: bool = Field(
        True, description="let ONNX Runtime's threads spin for work (faster alone; turn off on crowded cores)"
    )
    model_instances: int | None = Field(
        None,
        ge=1,
        le=64,
        description="model calls that run at once per version, overriding each tandem.json; the threads are shared "
        "out among them (2 instances of 1 thread each beat 1 of 2 under load on 2 cores)",
    )
    run_alone: bool | None = Field(
        None,
        description="overrides every tandem.json's run_alone: a call with the model to itself runs on all threads "
        "(a second session, a second copy of the weights); unset follows tandem.json (default on)",
    )
    inline_lone_ms: float = Field(
        5.0,
        ge=0,
        description="a lone call (see --run-alone) expected to take at most this long (from the lone calls before "
        "it) runs on the event loop's own thread instead of a worker thread: it skips two thread hand-offs "
        "(all-MiniLM-L6-v2 on 2 cores, paired runs: one short text at a time 4.83 -> 4.73 ms p50, 4 callers of one "
        "text 240 -> 249 texts/s) while the loop waits for the call, so longer calls (a larger model) keep the worker "
        "thread; 0 turns it off",
    )
    compute_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="how much less urgent the model's threads are than the stage's event loop (Linux niceness): "
        "admission, health and refusals stay fast while the model uses every spare cycle; 0 turns it off",
    )
    switch_interval_ms: float | None = Field(
        None,
        gt=0,
        description="Python's thread switch interval in this process (sys.setswitchinterval): how long the event "
        "loop may wait for the interpreter lock while a model thread holds it. Unset: 0.5 ms when torch sees a CUDA "
        "GPU (a model on a GPU holds the lock while it launches kernels; on an H200 0.5 ms gave 21% more tokens/s "
        "at 16 streams than 5 ms), else Python's 5 ms (on CPU the model's kernels release it)",
    )
    device: Literal["auto", "cpu", "cuda"] | None = Field(
        None, description="device for every model, overriding each tandem.json; unset follows tandem.json"
    )
    watch_interval_s: float = Field(
        1.0, ge=0, description="how often the repository is read for new versions and aliases; 0 turns it off"
    )
    unload_idle_s: float = Field(
        3.0, ge=0, description="a version leaving service unloads once no request has reached it for this long"
    )
    unload_timeout_s: float = Field(
        60.0, gt=0, description="longest a version leaving service answers new requests before it refuses them"
    )
