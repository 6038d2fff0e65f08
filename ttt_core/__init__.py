"""Library: TTT-DiT model, ops, sampling, decoding, training. Importable without ComfyUI."""
