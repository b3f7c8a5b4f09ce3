"""Evaluation: perplexity and the QDEC sweep behind `qdec eval`."""
