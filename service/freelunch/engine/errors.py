"""What any engine refuses, and how: torch-free, so that the API and the pool import it alone."""

from __future__ import annotations

from typing import Any


class EngineError(ValueError):
    """A request the engine cannot take (the API turns it into a 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def check_new_request(request: Any, live: dict, max_model_len: int, vocab_size: int) -> None:
    """What any engine refuses before taking a request (EngineError, with the field): an empty or
    too long prompt, token ids outside the vocabulary, an id already live."""
    n_prompt = len(request.prompt_token_ids)
    if n_prompt == 0:
        raise EngineError("the prompt is empty", "prompt")
    if n_prompt >= max_model_len:
        raise EngineError(
            f"the prompt has {n_prompt} tokens; this model's maximum context length is {max_model_len}", "messages"
        )
    if any(t < 0 or t >= vocab_size for t in request.prompt_token_ids):
        raise EngineError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
    if request.request_id in live:
        raise EngineError(f"duplicate request id {request.request_id}")


class OptionError(EngineError):
    """A method option the request cannot have; `param` names it (the API's `error.param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param)
