"""Model loading: GGUF v2/v3 files (:mod:`qdec.models.gguf`) and the Llama
loader for the embedded SmolLM2-135M-Instruct reference (dequantized Q4_1,
:mod:`qdec.models.llama`)."""
