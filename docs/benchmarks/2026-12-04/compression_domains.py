"""Mean cosine of the distilled and pruned MiniLM versions to the parent on held-out texts of three kinds."""

import random
import sysconfig
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from services.inference.export.accuracy import DEFAULT_TEXTS
from services.inference.export.corpus import _docstrings, _prose, builtin_corpus
from services.inference.export.distillation import pool

torch.set_num_threads(2)
site = Path(sysconfig.get_paths()["purelib"])
texts = []
for pkg in ("requests", "click", "jinja2", "yaml", "packaging"):
    for path in sorted((site / pkg).rglob("*.py")) if (site / pkg).is_dir() else []:
        for doc in _docstrings(path):
            texts += _prose(doc)
corpus = set(builtin_corpus().texts)
held = [t for t in dict.fromkeys(texts) if t not in corpus]
random.Random(0).shuffle(held)
held = held[:200]
train = list(builtin_corpus().texts)
random.Random(1).shuffle(train)
sets = {
    "built-in held-out texts (36, everyday)": list(DEFAULT_TEXTS),
    "docstrings of installed packages (200, in domain, not in the corpus)": held,
    "corpus texts (200, seen in training)": train[:200],
}
repo = Path("/tmp/mb/repo/minilm")
tok = AutoTokenizer.from_pretrained(str(repo / "1"))


def embed(model, batch):
    out = []
    for i in range(0, len(batch), 32):
        enc = tok(batch[i : i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            v = pool(model(**enc).last_hidden_state, enc["attention_mask"], "mean")
        out.append(torch.nn.functional.normalize(v, dim=-1))
    return torch.cat(out)


parent = AutoModel.from_pretrained(str(repo / "1")).eval()
for name, batch in sets.items():
    want = embed(parent, batch)
    for v in ("5", "4"):
        got = embed(AutoModel.from_pretrained(str(repo / v)).eval(), batch)
        cos = (want * got).sum(-1)
        print(f"{name}: version {v}: mean cosine {cos.mean():.4f}, min {cos.min():.4f}")
short = [t for t in DEFAULT_TEXTS if len(t.split()) <= 3]
want = embed(parent, short)
got = embed(AutoModel.from_pretrained(str(repo / "5")).eval(), short)
print(
    "shortest built-in texts, version 5:",
    [(t, round(float(c), 3)) for t, c in zip(short, (want * got).sum(-1), strict=True)],
)
