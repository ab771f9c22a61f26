"""longreach: long-context LLMs end to end — extend, train, serve, and prove the context is usable."""
__version__ = "0.1.0"
