"""The gateway: Tandem's public API, running tokenizer -> inference -> postprocess for every request."""
