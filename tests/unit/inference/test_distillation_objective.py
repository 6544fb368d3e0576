"""The layer choice of a --layers embedding student and the dense terms of its objective, on tiny BERT models."""

from __future__ import annotations

import copy

import torch
from transformers import BertConfig, BertModel

from services.common.repository import Task
from services.inference.export import pruning
from services.inference.export.distillation import Student, _embedding_loss, _matched_layers, _states


def _bert(layers: int = 4) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32
    )
    model = BertModel(config)
    model.train(False)
    return model


def _stack(model: torch.nn.Module) -> list[torch.nn.Module]:
    holder, attr = pruning.layer_stack(model)
    return list(getattr(holder, attr))


def test_closest_layers_drops_the_layers_that_matter_least_and_leaves_the_model_whole() -> None:
    model = _bert(4)
    stack = _stack(model)

    def closeness(candidate: torch.nn.Module) -> float:
        kept = _stack(candidate)
        return float(sum(2 ** stack.index(layer) for layer in kept))  # later layers matter more here

    assert pruning.closest_layers(model, 2, closeness) == [2, 3]
    assert _stack(model) == stack
    assert pruning.closest_layers(model, 4, closeness) == [0, 1, 2, 3]


def test_a_student_copied_from_its_teacher_has_no_loss_and_a_changed_one_has() -> None:
    teacher = _bert(4)
    kept = [0, 3]
    student = copy.deepcopy(teacher)
    pruning.keep_layers(student, kept)
    spec = Student(Task.EMBEDDING, teacher_layers=tuple(kept))
    student_layers, teacher_layers = _matched_layers(spec, student)
    assert (student_layers, teacher_layers) == ([0], [0])
    batch = {
        "input_ids": torch.tensor([[1, 5, 7, 2, 0], [1, 9, 2, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
    }
    with torch.inference_mode():
        same = _embedding_loss(
            _states(student, spec, batch, student_layers),
            _states(student, spec, batch, student_layers),
            batch["attention_mask"],
        )
        apart = _embedding_loss(
            _states(student, spec, batch, student_layers),
            _states(teacher, spec, batch, teacher_layers),
            batch["attention_mask"],
        )
    assert float(same) < 1e-6 < float(apart)
