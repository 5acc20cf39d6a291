"""ST-LLM in JAX/Flax: every spatio-temporal video token goes into the LLM."""
