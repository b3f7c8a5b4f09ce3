"""Model loaders: the embedded SmolLM2-135M reference model (GGUF)."""
