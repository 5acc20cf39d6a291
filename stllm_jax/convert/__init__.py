"""PyTorch weights <-> stllm_jax weights directories (`python -m stllm_jax.convert`, see `cli`).

mappings      the name tables of every layout (Hugging Face, LAVIS, ST-LLM), both directions
strict        strict streaming assembly: every source tensor used once, every parameter filled
tensor_files  safetensors / .bin / .pth reading one tensor at a time, streaming safetensors writing
hf            Hugging Face configs <-> our config.model
sources       the four source kinds and the conversion into a weights directory
export        weights directory -> Hugging Face directory
reference     the PyTorch reference model of a source; verify: it against the converted model
"""
