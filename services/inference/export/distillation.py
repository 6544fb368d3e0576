"""Knowledge distillation: a student model trained to reproduce its teacher's outputs on a corpus of texts.

What is matched is what serving returns: the pooled embedding (1 - cosine, plus the mean squared error) for
`embedding`, and, since one pooled vector per text is a thin signal, the teacher's token states too: the student's
last hidden state token by token against the teacher's (mean squared error over real tokens), and each other student
layer's output against the output of the teacher layer it was copied from (`Student.teacher_layers`; TinyBERT, Jiao
et al. 2020), each weighted by TOKEN_WEIGHT and LAYER_WEIGHT. Measured on all-MiniLM-L6-v2, 3 of 6 layers
(docs/models.md): at the same steps the dense terms give a slightly closer student than the pooled loss alone (mean
cosine +0.003 to +0.006 after 100 steps) at about the same time per step; which layers the student keeps (chosen by
the caller: `pruning.closest_layers`) and short texts in the corpus weigh far more. For the classifiers: the logits
softened by a temperature (KL divergence for single-label softmax, binary cross-entropy for multi-label and
single-score models); the next-token distribution at every position for `text-generation` (KL,
temperature-softened). Sequence-level teacher outputs of the classifiers are computed once for the whole corpus
before training, so they do not depend on which texts share a padded batch; token-level ones (and an embedding
model's token states) are computed per step, in inference mode.

Training is AdamW with a linear warm-up (5% of the steps) and linear decay, gradients clipped at 1.0, no dropout.
Batches are drawn by a generator seeded with `seed`; a checkpoint holds the student, the optimiser, the schedule and
the generator, so a resumed run continues exactly where the interrupted one stood and the same seed gives the same
student (on the same machine, device and thread count).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.common.repository import Task

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
# Embedding students: weights of the token-level terms beside the pooled loss (see the module docstring).
TOKEN_WEIGHT = 1.0
LAYER_WEIGHT = 1.0
# Texts per teacher forward pass when its outputs are computed ahead.
_TEACHER_BATCH = 64


class DistillationError(ValueError):
    """The distillation cannot run as asked."""


@dataclass(frozen=True)
class DistillSettings:
    steps: int
    batch_size: int
    lr: float
    seed: int
    temperature: float = 2.0
    max_tokens: int = 128
    checkpoint_every: int = 200
    device: str = "cpu"


@dataclass(frozen=True)
class DistillResult:
    steps: int
    resumed_from: int
    seconds: float
    loss: float


@dataclass(frozen=True)
class Student:
    """What the objective needs to know about the models: the task and how serving pools and scores."""

    task: Task
    pooling: str = "mean"
    multi_label: bool = False
    # The teacher layer each student layer was copied from, when the student is the teacher with layers removed:
    # an embedding student's layer i is then matched to that teacher layer's output. None: only the last.
    teacher_layers: tuple[int, ...] | None = None


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """The serving stage's pooling of [b, s, h] token vectors (before normalisation)."""
    if how == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if how == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _output(model: nn.Module, spec: Student, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    if spec.task is Task.EMBEDDING:
        return pool(out.last_hidden_state, batch["attention_mask"], spec.pooling)
    logits: torch.Tensor = out.logits
    return logits


@dataclass(frozen=True)
class _States:
    """An embedding model's pooled output and the token states that the dense terms compare."""

    pooled: torch.Tensor
    hidden: list[torch.Tensor]  # [b, s, h]: the outputs of the matched layers, the last one last


def _states(model: nn.Module, spec: Student, batch: dict[str, torch.Tensor], layers: Sequence[int]) -> _States:
    """`layers`: which of the model's layer outputs (0-based) to return besides the last."""
    out = model(**batch, output_hidden_states=bool(layers))
    last: torch.Tensor = out.last_hidden_state
    hidden = [out.hidden_states[i + 1] for i in layers] + [last]
    return _States(pool(last, batch["attention_mask"], spec.pooling), hidden)


def _token_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of [b, s, h] token states over the real (unpadded) tokens."""
    weights = mask.unsqueeze(-1).to(student.dtype)
    return (((student - teacher) ** 2) * weights).sum() / (weights.sum().clamp(min=1) * student.shape[-1])


def _embedding_loss(student: _States, teacher: _States, mask: torch.Tensor) -> torch.Tensor:
    cosine = nn.functional.cosine_similarity(student.pooled, teacher.pooled, dim=-1)
    loss = (1 - cosine).mean() + nn.functional.mse_loss(student.pooled, teacher.pooled)
    loss = loss + TOKEN_WEIGHT * _token_mse(student.hidden[-1], teacher.hidden[-1], mask)
    inner = list(zip(student.hidden[:-1], teacher.hidden[:-1], strict=True))
    for got, want in inner:
        loss = loss + LAYER_WEIGHT * _token_mse(got, want, mask) / len(inner)
    return loss


def _matched_layers(spec: Student, student: nn.Module) -> tuple[list[int], list[int]]:
    """(student layers, teacher layers) whose outputs an embedding student matches besides the last."""
    if spec.task is not Task.EMBEDDING or spec.teacher_layers is None:
        return [], []
    from services.inference.export.pruning import layer_count

    if len(spec.teacher_layers) != layer_count(student):
        raise DistillationError(
            f"the student has {layer_count(student)} layers but teacher_layers names {len(spec.teacher_layers)}"
        )
    inner = range(len(spec.teacher_layers) - 1)
    return list(inner), [spec.teacher_layers[i] for i in inner]


def _soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) per row of logits at temperature t, scaled by t^2 (Hinton et al. 2015)."""
    target = torch.log_softmax(teacher / t, dim=-1)
    guess = torch.log_softmax(student / t, dim=-1)
    return (target.exp() * (target - guess)).sum(dim=-1) * t * t


def _loss(spec: Student, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, t: float) -> torch.Tensor:
    if spec.task is Task.EMBEDDING:
        cosine = nn.functional.cosine_similarity(student, teacher, dim=-1)
        return (1 - cosine).mean() + nn.functional.mse_loss(student, teacher)
    if spec.task in (Task.TOKEN_CLASSIFICATION, Task.TEXT_GENERATION):
        per_token = _soft_cross_entropy(student, teacher, t)
        if spec.task is Task.TEXT_GENERATION:
            mask = mask[:, : per_token.shape[1]]
        weights = mask.to(per_token.dtype)
        return (per_token * weights).sum() / weights.sum().clamp(min=1)
    if spec.multi_label or student.shape[-1] == 1:
        return nn.functional.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t)) * t * t
    return _soft_cross_entropy(student, teacher, t).mean()


class TokenizedTexts:
    """The corpus tokenized once; padded batches of any rows on demand. Rerank models see (text, next text) pairs."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], spec: Student, max_tokens: int) -> None:
        pairs = list(texts[1:]) + list(texts[:1]) if spec.task is Task.RERANK else None
        encoded = tokenizer(list(texts), pairs, truncation=True, max_length=max_tokens)
        self.ids: list[list[int]] = encoded["input_ids"]
        self.types: list[list[int]] | None = encoded.get("token_type_ids")
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad = int(pad)
        self.segments = spec.task is not Task.TEXT_GENERATION and self.types is not None

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        width = max(len(self.ids[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(self.ids[r])
            ids[i, :n] = torch.tensor(self.ids[r])
            mask[i, :n] = 1
            if self.segments and self.types is not None:
                types[i, :n] = torch.tensor(self.types[r])
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if self.segments:
            batch["token_type_ids"] = types.to(device)
        return batch


def _teacher_targets(
    teacher: nn.Module, spec: Student, texts: TokenizedTexts, device: torch.device
) -> torch.Tensor | None:
    """Sequence-level outputs of the teacher for every text (None for token-level tasks and embeddings, computed per
    step)."""
    if spec.task in (Task.TOKEN_CLASSIFICATION, Task.TEXT_GENERATION, Task.EMBEDDING):
        return None
    order = sorted(range(len(texts)), key=lambda r: (len(texts.ids[r]), r))
    rows: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for start in range(0, len(order), _TEACHER_BATCH):
            chunk = order[start : start + _TEACHER_BATCH]
            out = _output(teacher, spec, texts.batch(chunk, device)).float()
            rows.update(zip(chunk, out, strict=True))
    return torch.stack([rows[r] for r in range(len(texts))])


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def distill(
    teacher: nn.Module,
    student: nn.Module,
    spec: Student,
    tokenizer: Any,
    texts: Sequence[str],
    settings: DistillSettings,
    checkpoint: Path,
    resume: bool,
    progress: Callable[..., Any] | None = None,
) -> DistillResult:
    """Trains `student` in place towards `teacher` on `texts`; writes `checkpoint` every settings.checkpoint_every
    steps and, with `resume`, continues from it. `progress` is a tqdm-like factory (None: tqdm on stderr)."""
    if not texts:
        raise DistillationError("the corpus holds no texts")
    if settings.steps < 1 or settings.batch_size < 1 or settings.lr <= 0 or settings.temperature <= 0:
        raise DistillationError("--steps, --batch-size, --lr and the temperature must be positive")
    device = torch.device(settings.device)
    torch.manual_seed(settings.seed)
    teacher.to(device).eval()
    student.to(device).eval()  # no dropout: the same seed gives the same student
    corpus = TokenizedTexts(tokenizer, texts, spec, settings.max_tokens)
    targets = _teacher_targets(teacher, spec, corpus, device)
    student_layers, teacher_layers = _matched_layers(spec, student)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=0.01)
    warmup = max(1, settings.steps // 20)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * max(0.0, (settings.steps - step) / settings.steps)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    start = 0
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        start = int(state["step"])
        log.info("resuming from %s at step %d", checkpoint, start)
    if progress is None:
        from tqdm import tqdm

        progress = tqdm
    bar = progress(total=settings.steps, initial=start, desc="distill", unit="step", file=sys.stderr)
    started = time.perf_counter()
    average = 0.0
    try:
        for step in range(start, settings.steps):
            rows = torch.randint(0, len(corpus), (settings.batch_size,), generator=generator)
            batch = corpus.batch(rows.tolist(), device)
            if spec.task is Task.EMBEDDING:
                with torch.inference_mode():
                    taught = _states(teacher, spec, batch, teacher_layers)
                taught = _States(taught.pooled.clone(), [h.clone() for h in taught.hidden])
                loss = _embedding_loss(_states(student, spec, batch, student_layers), taught, batch["attention_mask"])
            elif targets is not None:
                want = targets[rows.to(device)]
                got = _output(student, spec, batch).float()
                loss = _loss(spec, got, want, batch["attention_mask"], settings.temperature)
            else:
                with torch.inference_mode():
                    want = _output(teacher, spec, batch).float()
                got = _output(student, spec, batch).float()
                loss = _loss(spec, got, want.clone(), batch["attention_mask"], settings.temperature)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            value = float(loss.detach())
            average = value if step == start else 0.98 * average + 0.02 * value
            bar.set_postfix(loss=f"{average:.5f}", refresh=False)
            bar.update(1)
            done = step + 1
            if done % settings.checkpoint_every == 0 and done < settings.steps:
                _save(
                    checkpoint,
                    {
                        "step": done,
                        "student": student.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "generator": generator.get_state(),
                    },
                )
    finally:
        bar.close()
    student.to("cpu").eval()
    teacher.to("cpu")
    return DistillResult(settings.steps, start, time.perf_counter() - started, average)
