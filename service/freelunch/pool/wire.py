"""Messages between the API process and its worker processes: msgpack over a pipe, never pickle.

A message is `[kind, *fields]`; typed fields are rebuilt with msgspec from plain values.
"""

from __future__ import annotations

from typing import Any

import msgspec

from freelunch.engine.messages import GenerationRequest, RequestOutput
from freelunch.pool.engine_loop import WorkerStats

# parent -> worker
ADD, ABORT, SHUTDOWN = "add", "abort", "shutdown"
# worker -> parent
READY, STEP, FAILED, FATAL, HEARTBEAT = "ready", "step", "failed", "fatal", "heartbeat"

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def encode(kind: str, *fields: Any) -> bytes:
    return _encoder.encode([kind, *fields])


def decode(data: bytes) -> list[Any]:
    message = _decoder.decode(data)
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ValueError("malformed worker message")
    return message


def as_request(value: Any) -> GenerationRequest:
    return msgspec.convert(value, GenerationRequest)


def as_outputs(value: Any) -> list[RequestOutput]:
    return msgspec.convert(value, list[RequestOutput])


def as_stats(value: Any) -> WorkerStats:
    return msgspec.convert(value, WorkerStats)
