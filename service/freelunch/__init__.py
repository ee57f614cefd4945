"""freelunch: an OpenAI-compatible inference server with training-free decoding methods."""
__version__ = "0.1.0"
