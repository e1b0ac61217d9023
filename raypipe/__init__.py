"""raypipe: synthesize visual-instruction data (the StableLLaVA method) on Ray, and tune LLaVA on it."""

__version__ = "0.1.0"
