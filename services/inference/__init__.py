"""The inference stage: token ids to model outputs with ONNX Runtime or PyTorch, behind a dynamic batcher."""
