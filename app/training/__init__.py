"""Training of Sift's own models: `reranker` (cross-encoder) and `reader` (extractive span QA)."""
