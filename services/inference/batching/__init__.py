"""Dynamic batching: queued requests (requests), the cut of a round into model calls (planner), the Batcher."""
