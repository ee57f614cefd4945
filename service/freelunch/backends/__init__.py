"""Engines other than our own behind the same worker interface (`--engine vllm`)."""
