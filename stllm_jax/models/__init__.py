"""Flax linen modules, one network per file: eva_vit, qformer, llama, and their composition stllm."""
