"""The postprocess stage: model outputs to embeddings, ranked labels, entities and relevance scores."""
