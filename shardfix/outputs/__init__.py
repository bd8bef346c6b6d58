"""Output layouts: what an output directory holds besides the weights (Hugging Face sidecars, PEFT adapters)."""
