"""Structured pruning of a Hugging Face transformer: whole layers, FFN neurons and attention heads removed, so that
the weights really shrink and the result is an ordinary folder transformers loads (uniform per-layer sizes written
into config.json), never masks over the old shapes.

Which parts go is decided by importance measured on a calibration corpus, each the norm of what the part adds to
the residual stream, averaged over real (unpadded) tokens:

- an FFN neuron: mean |activation| x the L2 norm of its column in the down projection (where the down
  projection has a bias, what a removed neuron added on average, its mean activation times that column, is folded
  into it);
- an attention head: mean L2 norm of its context vector multiplied by its slice of the output projection;
- a layer: 1 - the mean cosine between its input and output hidden states ("block influence", Men et al. 2024,
  ShortGPT): a layer that hardly turns its input goes first.

Every layer keeps the same number of neurons (and heads), the most important in that layer, since transformers
builds all layers from one intermediate_size and one head count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Texts per calibration forward pass.
CALIBRATION_BATCH = 16


class PruningError(ValueError):
    """The model cannot be pruned as asked (an unsupported architecture or an impossible size)."""


@dataclass(frozen=True)
class _Slot:
    """A linear layer and where it hangs, so that it can be replaced by a smaller one."""

    parent: nn.Module
    name: str

    @property
    def linear(self) -> nn.Linear:
        module = getattr(self.parent, self.name)
        if not isinstance(module, nn.Linear):
            raise PruningError(f"{type(self.parent).__name__}.{self.name} is not a linear layer")
        return module

    def keep(self, index: torch.Tensor, dim: int) -> None:
        """Keeps rows (dim 0: output features) or columns (dim 1: input features) `index` of the weight."""
        old = self.linear
        weight = old.weight.detach().index_select(dim, index).clone()
        bias = old.bias
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        new.weight = nn.Parameter(weight)
        if bias is not None:
            new.bias = nn.Parameter((bias.detach().index_select(0, index) if dim == 0 else bias.detach()).clone())
        setattr(self.parent, self.name, new)


@dataclass(frozen=True)
class _Block:
    """The parts of one transformer layer that pruning changes."""

    ffn_in: tuple[_Slot, ...]  # rows are neurons
    ffn_out: _Slot  # columns are neurons
    query: _Slot | None  # rows are heads x head size (None: heads cannot be pruned in this family)
    key_value: tuple[_Slot, ...]
    attn_out: _Slot  # columns are heads x head size


def layer_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """(module holding the list of transformer layers, its attribute): BERT-family encoders, Llama-style and GPT-2
    decoders."""
    base: Any = getattr(model, "base_model", model)
    for holder_path, attr in (("encoder", "layer"), ("", "layers"), ("", "h"), ("transformer", "layer")):
        holder = base
        for part in filter(None, holder_path.split(".")):
            holder = getattr(holder, part, None)
        if holder is not None and isinstance(getattr(holder, attr, None), nn.ModuleList):
            return holder, attr
    raise PruningError(f"{type(model).__name__}: no list of transformer layers found (BERT-family or Llama-style)")


def _layers(model: nn.Module) -> nn.ModuleList:
    holder, attr = layer_stack(model)
    layers = getattr(holder, attr)
    assert isinstance(layers, nn.ModuleList)
    return layers


def _config(model: nn.Module) -> Any:
    """The Hugging Face config of a model (a PretrainedConfig; torch types module attributes as tensors or modules)."""
    return getattr(model, "config")  # noqa: B009


def _block(module: nn.Module) -> _Block:
    layer: Any = module
    if hasattr(layer, "intermediate") and hasattr(layer, "attention"):  # BERT, RoBERTa, XLM-R, ELECTRA
        attention = layer.attention
        return _Block(
            ffn_in=(_Slot(layer.intermediate, "dense"),),
            ffn_out=_Slot(layer.output, "dense"),
            # transformers 5 derives a BERT head's size from hidden_size / num_attention_heads and has no
            # pruned_heads: fewer heads would not load, so heads stay.
            query=None,
            key_value=(),
            attn_out=_Slot(attention.output, "dense"),
        )
    if hasattr(layer, "mlp") and hasattr(layer, "self_attn") and hasattr(layer.mlp, "down_proj"):  # Llama-style
        attn = layer.self_attn
        return _Block(
            ffn_in=tuple(_Slot(layer.mlp, n) for n in ("gate_proj", "up_proj") if hasattr(layer.mlp, n)),
            ffn_out=_Slot(layer.mlp, "down_proj"),
            query=_Slot(attn, "q_proj"),
            key_value=(_Slot(attn, "k_proj"), _Slot(attn, "v_proj")),
            attn_out=_Slot(attn, "o_proj"),
        )
    raise PruningError(f"{type(layer).__name__}: FFN and head pruning support BERT-family and Llama-style layers")


def blocks(model: nn.Module) -> list[_Block]:
    return [_block(layer) for layer in _layers(model)]


def layer_count(model: nn.Module) -> int:
    return len(_layers(model))


def spread_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices spread evenly over the depth, the first and the last always among them (DistilBERT
    keeps every other layer; the last matters most for matching the output)."""
    if not 1 <= keep <= total:
        raise PruningError(f"--layers must be between 1 and {total} (the model has {total} layers), got {keep}")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def closest_layers(model: nn.Module, keep: int, closeness: Callable[[nn.Module], float]) -> list[int]:
    """`keep` layer indices chosen greedily: from the whole stack, the layer whose removal leaves the model closest to
    the whole one (`closeness` of the model as it stands, higher is closer) goes, until `keep` remain; ties go to the
    earlier layer. The model is left whole. For all-MiniLM-L6-v2, 3 of 6, this gives [0, 4, 5] (pooled cosine 0.70
    on the corpus before any training) where `spread_layers` gives [0, 2, 5] (0.58)."""
    holder, attr = layer_stack(model)
    layers = getattr(holder, attr)
    if not 1 <= keep <= len(layers):
        raise PruningError(f"--layers must be between 1 and {len(layers)} (the model has {len(layers)}), got {keep}")
    kept = list(range(len(layers)))
    try:
        while len(kept) > keep:
            scores = []
            for drop in kept:
                setattr(holder, attr, nn.ModuleList([layers[i] for i in kept if i != drop]))
                scores.append((closeness(model), -drop))
            kept.remove(-max(scores)[1])
    finally:
        setattr(holder, attr, layers)
    return kept


def keep_layers(model: nn.Module, keep: Sequence[int]) -> None:
    """Keeps the layers at `keep` (ascending), renumbering their cache indices and the config."""
    holder, attr = layer_stack(model)
    layers = getattr(holder, attr)
    kept = nn.ModuleList([layers[i] for i in keep])
    for position, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", position)  # noqa: B010
    setattr(holder, attr, kept)
    config = _config(model)
    config.num_hidden_layers = len(keep)
    for field in ("layer_types",):
        values = getattr(config, field, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, field, [values[i] for i in keep])


Batches = Callable[[], Iterator[dict[str, torch.Tensor]]]


@dataclass
class Importance:
    """Scores from one pass over the calibration corpus: per layer, per FFN neuron and per attention head."""

    layers: list[float]
    neurons: list[torch.Tensor]
    heads: list[torch.Tensor] | None
    mean_activations: list[torch.Tensor]


def measure_importance(model: nn.Module, batches: Batches, head_size: int | None) -> Importance:
    """Runs the model over the calibration batches (dicts of input tensors with an attention_mask) with hooks on
    each layer's FFN and attention output projections; see the module doc for the scores."""
    parts = blocks(model)
    neurons = [torch.zeros(p.ffn_out.linear.in_features) for p in parts]
    means = [torch.zeros(p.ffn_out.linear.in_features) for p in parts]
    heads = [torch.zeros(p.attn_out.linear.in_features // head_size) for p in parts] if head_size else None
    turned = [0.0] * len(parts)
    tokens = 0
    mask: list[torch.Tensor] = []

    def ffn_hook(i: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            values = args[0][mask[0]].float()
            active = values.abs().sum(dim=0)
            means[i] += values.sum(dim=0)
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            neurons[i] += active.float() * weight.norm(dim=0).float()

        return hook

    def head_hook(i: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            assert heads is not None and head_size is not None
            context = args[0][mask[0]].float()  # [tokens, heads * head size]
            n_heads = context.shape[-1] // head_size
            assert isinstance(module.weight, torch.Tensor)
            weight = module.weight.float().reshape(-1, n_heads, head_size)
            added = torch.einsum("thd,ohd->tho", context.reshape(-1, n_heads, head_size), weight)
            heads[i] += added.norm(dim=-1).sum(dim=0)

        return hook

    handles = [p.ffn_out.linear.register_forward_pre_hook(ffn_hook(i)) for i, p in enumerate(parts)]
    if heads is not None:
        handles += [p.attn_out.linear.register_forward_pre_hook(head_hook(i)) for i, p in enumerate(parts)]
    try:
        with torch.inference_mode():
            for batch in batches():
                real = batch["attention_mask"].bool()
                mask[:] = [real]
                out = model(**batch, output_hidden_states=True)
                states = out.hidden_states
                for i in range(len(parts)):
                    before, after = states[i][real], states[i + 1][real]
                    turned[i] += float((1 - nn.functional.cosine_similarity(before, after, dim=-1)).sum())
                tokens += int(real.sum())
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise PruningError("the calibration corpus gave no tokens")
    return Importance(
        layers=[t / tokens for t in turned],
        neurons=[n / tokens for n in neurons],
        heads=None if heads is None else [h / tokens for h in heads],
        mean_activations=[m / tokens for m in means],
    )


def most_important_layers(importance: Importance, keep: int) -> list[int]:
    total = len(importance.layers)
    if not 1 <= keep <= total:
        raise PruningError(f"--layers must be between 1 and {total} (the model has {total} layers), got {keep}")
    ranked = sorted(range(total), key=lambda i: -importance.layers[i])
    return sorted(ranked[:keep])


def _kept(count: int, fraction: float, what: str) -> int:
    if not 0 <= fraction < 1:
        raise PruningError(f"{what}: the fraction to remove must be at least 0 and below 1, got {fraction}")
    keep = count - round(count * fraction)
    if keep < 1:
        raise PruningError(f"{what} {fraction} would remove all {count}; at least one must stay")
    return keep


def prune_ffn(model: nn.Module, fraction: float, importance: Importance) -> int:
    """Removes `fraction` of every layer's FFN neurons, the least important, folding their mean output into the
    bias; returns the size kept."""
    parts = blocks(model)
    size = parts[0].ffn_out.linear.in_features
    keep = _kept(size, fraction, "--ffn")
    for part, score, mean in zip(parts, importance.neurons, importance.mean_activations, strict=True):
        index = score.topk(keep).indices.sort().values
        removed = torch.ones(size, dtype=torch.bool)
        removed[index] = False
        out = part.ffn_out.linear
        if out.bias is not None:  # Llama's down projections have none (and a bias would not load)
            with torch.no_grad():
                out.bias.add_((out.weight[:, removed].float() @ mean[removed]).to(out.bias.dtype))
        for slot in part.ffn_in:
            slot.keep(index, dim=0)
        part.ffn_out.keep(index, dim=1)
    _config(model).intermediate_size = keep
    return keep


def prune_heads(model: nn.Module, fraction: float, scores: Sequence[torch.Tensor]) -> int:
    """Removes `fraction` of the query heads of every layer, the same number from each key/value group (so that
    grouped-query attention keeps its shape), the least important by `scores`; returns the heads kept per layer."""
    config = _config(model)
    parts = blocks(model)
    if any(p.query is None for p in parts):
        raise PruningError(
            f"--heads: {type(model).__name__} takes its head size from hidden_size / num_attention_heads in "
            "transformers, so fewer heads would not load; prune --ffn or --layers instead"
        )
    n_heads = int(config.num_attention_heads)
    n_groups = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_size = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    per_group = n_heads // n_groups
    keep_per_group = _kept(per_group, fraction, "--heads (per key/value group)")
    for part, score in zip(parts, scores, strict=True):
        chosen = []
        for group in range(n_groups):
            members = score[group * per_group : (group + 1) * per_group]
            chosen += sorted(group * per_group + int(i) for i in members.topk(keep_per_group).indices)
        index = torch.tensor([h * head_size + d for h in chosen for d in range(head_size)])
        assert part.query is not None
        part.query.keep(index, dim=0)
        part.attn_out.keep(index, dim=1)
        for module in (part.query.parent,):
            if hasattr(module, "num_key_value_groups"):
                setattr(module, "num_key_value_groups", keep_per_group)  # noqa: B010
    config.head_dim = head_size
    config.num_attention_heads = keep_per_group * n_groups
    return keep_per_group * n_groups


def attention_head_size(model: nn.Module) -> int | None:
    """The head size when heads can be pruned in this family (Llama-style), else None."""
    config = _config(model)
    if blocks(model)[0].query is None:
        return None
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
