"""Models: local causal LMs (`local`, `hf`, `quant`), sentence embeddings (`embed`), the
OpenAI-compatible API (`apiconfig`, `api`) and the generation modes (`generation`)."""
