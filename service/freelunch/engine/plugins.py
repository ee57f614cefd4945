"""Where request-level stages plug into the engine. Decoding methods (freelunch.methods) and
constraints (freelunch.constraints) are installed here, explicitly, by whoever builds an engine
(pool/local_engine.py `install_plugins()`); the engine reads these registries and imports neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from freelunch.engine.errors import OptionError
from freelunch.engine.model_info import ModelInfo
from freelunch.engine.request import GenerationRequest, Sequence
from freelunch.engine.strategy import DecodingStrategy


class StrategyPlugin(Protocol):
    """What the engine needs of a method's spec (methods/spec.py)."""

    option: str

    def build(self, request: GenerationRequest, main: Sequence, model_info: ModelInfo) -> DecodingStrategy: ...

    def off(self, options: dict[str, Any]) -> bool: ...


class ConstraintBuilder(Protocol):
    """Builds requests' constraints for one model: `build(request)` -> a constraint or None."""

    def build(self, request: GenerationRequest) -> Any: ...


# option name -> the method that serves it
STRATEGIES: dict[str, StrategyPlugin] = {}
# (request, main row, model info, the chosen methods' stages) -> one strategy running them all
COMPOSERS: list[Callable[[GenerationRequest, Sequence, Any, list[Any]], DecodingStrategy]] = []
# (tokenizer, vocab size) -> ConstraintBuilder; the last registered serves
CONSTRAINTS: list[Callable[[Any, int], ConstraintBuilder]] = []
# (takes images, decoder layers) -> the KV cache's split layer a method wants by default, or None
KV_SPLIT_HINTS: list[Callable[[bool, int], int | None]] = []


def build_strategy(request: GenerationRequest, main: Sequence, model_info: ModelInfo) -> DecodingStrategy:
    """The request's strategy: its method options' stages, composed (plain decoding without any).
    A method whose build returns a whole DecodingStrategy runs alone."""
    chosen = [name for name in request.methods if name in STRATEGIES and not STRATEGIES[name].off(request.methods[name])]
    unknown = sorted(name for name in request.methods if name not in STRATEGIES)
    if unknown:
        raise OptionError(f"method option(s) not available on this engine: {', '.join(unknown)}", unknown[0])
    if not chosen:
        return DecodingStrategy(request, main)
    built = []
    for name in chosen:
        try:
            built.append(STRATEGIES[name].build(request, main, model_info))
        except OptionError:
            raise
        except ValueError as e:
            raise OptionError(str(e), name) from e
    whole = [name for name, b in zip(chosen, built) if isinstance(b, DecodingStrategy)]
    if whole and len(built) == 1:
        return built[0]
    if whole or not COMPOSERS:
        raise OptionError(f"{', '.join(sorted(chosen))} cannot be combined on this engine", sorted(chosen)[-1])
    try:
        return COMPOSERS[-1](request, main, model_info, built)
    except OptionError:
        raise
    except ValueError as e:
        raise OptionError(str(e), chosen[-1]) from e


def constraint_builder(tokenizer: Any, vocab_size: int) -> ConstraintBuilder | None:
    return CONSTRAINTS[-1](tokenizer, vocab_size) if CONSTRAINTS else None


def kv_split_hint(takes_images: bool, num_layers: int) -> int:
    hints = [h(takes_images, num_layers) for h in KV_SPLIT_HINTS]
    return max((h for h in hints if h is not None), default=0)
