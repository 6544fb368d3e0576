"""The tokenizer stage: text to token ids with each model's own fast tokenizer."""
