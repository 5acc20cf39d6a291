"""Weights from other frameworks: name mappings (mappings), strict streaming assembly (strict), Hugging Face (hf)."""
