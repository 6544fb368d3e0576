"""Tandem: gRPC model serving in four stages (gateway, tokenizer, inference, postprocess)."""
