"""Hub names (`openai-community/gpt2-medium`): resolved through huggingface_hub's cache, then download.

Only safetensors, config and tokenizer files are fetched; pickle files never are.
Where no network exists the result is a one-line ModelLoadError, not a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

from llorch_cpud.errors import ModelLoadError

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
ALLOW = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
]


def looks_like_hub_name(name: str) -> bool:
    return bool(HUB_NAME.match(name)) and not name.endswith(".gguf")


def resolve_hub_name(name: str) -> Path:
    """A local folder holding the hub model's files: the cache if it has them, else a download."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError(f"{name}: looks like a hub name but huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=ALLOW, local_files_only=True))
    except Exception:
        pass  # not cached: try the network
    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=ALLOW, etag_timeout=10))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"{name}: not a local file or folder, and the Hugging Face Hub download failed "
            f"({type(e).__name__}: {reason[:200]}); pass a local model folder or .gguf file"
        ) from None
