"""Tandem stage services: tokenizer, inference, postprocess, and what they share."""
