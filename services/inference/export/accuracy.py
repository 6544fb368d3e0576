"""Accuracy of a derived version (export, int8, fp16) against its source model run by transformers in float32.

Both models see the same held-out texts one at a time (no padding, and dynamic quantisation sees each text's own
activation range), tokenized by the source version's tokenizer, and their outputs go through the postprocessing
that serving uses: pooling for embeddings, softmax or sigmoid for the classifiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from services.common.repository import AccuracyReport, ModelVersion, Task
from services.inference.backends.base import Backend, FloatArray, IntArray, token_level
from services.inference.backends.torch import load_hf_model, wrap_single_output
from services.postprocess.core import EmbeddingPostprocessor, sigmoid, softmax

# Held-out texts: short and long, questions, numbers, code-ish and non-English lines, since quantisation errors
# are largest on very short inputs (few tokens to average over) and on unusual tokens.
DEFAULT_TEXTS: tuple[str, ...] = (
    "A man is playing a guitar on the street.",
    "Someone is playing an instrument outdoors.",
    "The new movie is awesome.",
    "The cat sits outside.",
    "A woman is slicing an onion in the kitchen.",
    "How do I reset my password?",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The stock market fell sharply on Monday after the interest rate announcement.",
    "Quantum computers use qubits, which can represent zero and one at the same time.",
    "I loved the food but the service was painfully slow.",
    "This is the worst product I have ever bought; it broke after two days.",
    "Please send the invoice to the accounting department by Friday.",
    "The train to Amsterdam leaves from platform 4 at 10:15.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Can you recommend a good book about the history of Rome?",
    "The patient was prescribed 20 mg of the drug twice daily.",
    "Our team won the championship after a dramatic penalty shoot-out.",
    "It's raining cats and dogs outside, so take an umbrella.",
    "The function returns None when the key is missing from the dictionary.",
    "Der Hund spielt im Garten mit einem Ball.",
    "El gato duerme en el sofá.",
    "Machine learning models can be compressed with quantisation and pruning.",
    "He apologised for the delay and promised to fix the bug in the next release.",
    "Children are playing football in the park near the river.",
    "The museum is closed on Mondays and public holidays.",
    "Battery life is excellent, easily lasting two full days.",
    "Where can I find the nearest pharmacy?",
    "Climate change is raising sea levels and increasing the frequency of extreme weather.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "A fast tokenizer splits text into word pieces.",
    "Thanks!",
    "ok",
    "The quick brown fox jumps over the lazy dog.",
    "Our quarterly revenue grew by 12 percent compared with the same period last year, driven mainly by strong "
    "demand for cloud services in Europe and Asia, while operating costs remained flat.",
    "After landing, passengers should keep their seat belts fastened until the aircraft has come to a complete "
    "stop at the gate and the captain has switched off the seat belt sign.",
)


@dataclass(frozen=True)
class _Encoded:
    input_ids: IntArray
    attention_mask: IntArray
    token_type_ids: IntArray


def _encode(reference: ModelVersion, texts: Sequence[str]) -> list[_Encoded]:
    """Each text alone; rerank models get (text, next text) pairs, so segment ids are exercised."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(reference.path))
    pairs = list(texts[1:]) + list(texts[:1]) if reference.task is Task.RERANK else None
    out = []
    for i, text in enumerate(texts):
        encoded = tokenizer(
            text,
            pairs[i] if pairs is not None else None,
            truncation=True,
            max_length=reference.max_length,
            return_tensors="np",
        )
        ids = encoded["input_ids"].astype(np.int64)
        types = encoded.get("token_type_ids")
        out.append(
            _Encoded(
                ids,
                encoded["attention_mask"].astype(np.int64),
                np.zeros_like(ids) if types is None else types.astype(np.int64),
            )
        )
    return out


def _probabilities(model: ModelVersion, logits: FloatArray) -> FloatArray:
    if model.multi_label or logits.shape[-1] == 1:
        return sigmoid(logits)
    return softmax(logits)


def _predictions(model: ModelVersion, probs: FloatArray) -> npt.NDArray[np.int64]:
    """Top-1 label per row; the side of 0.5 for single-score models; the set of labels over 0.5 (as bits) for
    multi-label ones."""
    if model.multi_label or probs.shape[-1] == 1:
        bits = (probs > 0.5).astype(np.int64)
        weights = 1 << np.arange(bits.shape[-1], dtype=np.int64)
        return (bits * weights).sum(axis=-1)  # type: ignore[no-any-return]
    return probs.argmax(axis=-1).astype(np.int64)  # type: ignore[no-any-return]


def accuracy_report(
    candidate: Backend, model: ModelVersion, reference: ModelVersion, texts: Sequence[str], threads: int
) -> AccuracyReport:
    """Compares the candidate backend (serving `model`) with `reference`'s Hugging Face weights in float32."""
    if not texts:
        raise ValueError("no texts to compare on")
    torch.set_num_threads(threads)
    module, takes_segments = wrap_single_output(load_hf_model(reference), reference.task)
    encoded = _encode(reference, texts)
    cosines: list[float] = []
    agree = total = 0
    worst = 0.0
    pooling = EmbeddingPostprocessor(model.pooling)
    with torch.inference_mode():
        for e in encoded:
            args = [torch.from_numpy(e.input_ids), torch.from_numpy(e.attention_mask)]
            if takes_segments:
                args.append(torch.from_numpy(e.token_type_ids))
            want = module(*args).float().numpy()[0]
            segments = e.token_type_ids if candidate.uses_token_type_ids else None
            got = candidate.run(e.input_ids, e.attention_mask, segments)[0]
            if model.task is Task.EMBEDDING:
                cu = np.array([0, len(want)], dtype=np.int32)
                a = pooling.pool(want.astype(np.float32), cu, normalize=True)[0]
                b = pooling.pool(got.astype(np.float32), cu, normalize=True)[0]
                cosines.append(float(np.dot(a, b)))
                continue
            rows_want = want if token_level(model.task) else want[None, :]
            rows_got = got if token_level(model.task) else got[None, :]
            p_want, p_got = _probabilities(model, rows_want), _probabilities(model, rows_got)
            worst = max(worst, float(np.abs(p_want - p_got).max()))
            agree += int((_predictions(model, p_want) == _predictions(model, p_got)).sum())
            total += len(rows_want)
    if model.task is Task.EMBEDDING:
        values = np.array(cosines)
        return AccuracyReport(
            reference=reference.ref,
            texts=len(texts),
            min_cosine=round(float(values.min()), 6),
            mean_cosine=round(float(values.mean()), 6),
        )
    return AccuracyReport(
        reference=reference.ref,
        texts=len(texts),
        top1_agreement=round(agree / max(total, 1), 6),
        max_probability_difference=round(worst, 6),
    )


def generation_report(
    candidate: torch.nn.Module, reference: ModelVersion, texts: Sequence[str], threads: int
) -> AccuracyReport:
    """A text-generation candidate (a causal LM) against `reference`: at every position of every text, whether both
    predict the same next token (top1_agreement), and the largest difference of a next-token probability."""
    from transformers import AutoTokenizer

    if not texts:
        raise ValueError("no texts to compare on")
    torch.set_num_threads(threads)
    teacher = load_hf_model(reference)
    tokenizer = AutoTokenizer.from_pretrained(str(reference.path))
    agree = total = 0
    worst = 0.0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=reference.max_length, return_tensors="pt")["input_ids"]
            want = torch.softmax(teacher(input_ids=ids).logits[0].float(), dim=-1)
            got = torch.softmax(candidate(input_ids=ids).logits[0].float(), dim=-1)
            agree += int((want.argmax(dim=-1) == got.argmax(dim=-1)).sum())
            total += want.shape[0]
            worst = max(worst, float((want - got).abs().max()))
    return AccuracyReport(
        reference=reference.ref,
        texts=len(texts),
        top1_agreement=round(agree / max(total, 1), 6),
        max_probability_difference=round(worst, 6),
    )
