"""The sampling a request gets when it names none: the model's own recommendation where its files carry one,
otherwise llama.cpp's defaults. One place for where `generate` and the OpenAI routes' defaults come from
(`/execute` keeps SPEC §4's defaults and never reads these).

Sources, first found wins:
- a Hugging Face folder's `generation_config.json`, when it names any of do_sample, temperature, top_k, top_p,
  min_p, repetition_penalty. It is read as transformers reads it: `do_sample` false or absent is greedy
  decoding (temperature 0; repetition_penalty still applies); with `do_sample: true`, the keys given, and
  transformers' own defaults for the others (temperature 1.0, top_k 50, top_p 1.0, min_p off,
  repetition_penalty 1.0). A file holding only token ids (GPT-2's, SmolLM2's) recommends nothing.
- a GGUF file's `general.sampling.*` keys (llama.cpp's names: temp, top_k, top_p, min_p, penalty_repeat);
  keys not given take llama.cpp's defaults, as llama.cpp does. SmolLM2-135M-Instruct's GGUF has none.
- llama.cpp's defaults (common/common.h `common_params_sampling`): temperature 0.8, top_k 40, top_p 0.95,
  min_p 0.05, repeat_penalty 1.0.
A value outside what the sampler accepts (e.g. temperature 3) is ignored (the default stands) and named in
`source`. Explicit request fields always win over these.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from llorch_cpud.sampling import SamplingParams

LLAMA_CPP = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.0}
TRANSFORMERS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}
HF_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")
GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
             "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
             "general.sampling.penalty_repeat": "repetition_penalty"}
RANGES = {"temperature": (0.0, 2.0), "top_k": (0, None), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
          "repetition_penalty": (0.0, 2.0)}
MAX_CONFIG_BYTES = 1 << 20
LLAMA_CPP_SOURCE = "llama.cpp defaults (the model's files recommend no sampling)"


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = LLAMA_CPP["temperature"]
    top_k: int = LLAMA_CPP["top_k"]
    top_p: float = LLAMA_CPP["top_p"]
    min_p: float = LLAMA_CPP["min_p"]
    repetition_penalty: float = LLAMA_CPP["repetition_penalty"]
    source: str = LLAMA_CPP_SOURCE

    def params(self, **given) -> SamplingParams:
        """SamplingParams with the fields given (not None) and these defaults for the rest."""
        values = {k: getattr(self, k) for k in RANGES}
        values.update({k: v for k, v in given.items() if v is not None})
        return SamplingParams(**values)

    def describe(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        return (f"temperature {self.temperature:g}, top_k {self.top_k}, top_p {self.top_p:g}, min_p {self.min_p:g}, "
                f"repetition_penalty {self.repetition_penalty:g} ({self.source})")


def _valid(name: str, value) -> bool:
    lo, hi = RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if name == "top_k" and (not float(value).is_integer()):
        return False
    return math.isfinite(value) and value >= lo and (hi is None or value <= hi)


def _build(values: dict, base: dict, source: str) -> SamplingDefaults:
    out, bad = dict(base), []
    for k, v in values.items():
        if _valid(k, v):
            out[k] = int(v) if k == "top_k" else float(v)
        else:
            bad.append(f"{k}={v!r}")
    if bad:
        source += f"; ignored out-of-range {', '.join(bad)}"
    return SamplingDefaults(**out, source=source)


def from_generation_config(path: Path) -> SamplingDefaults | None:
    """The recommendation of a generation_config.json, or None when it names no sampling (or cannot be read)."""
    try:
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:  # a real one is a few hundred bytes
            return None
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(cfg, dict) or not any(k in cfg for k in HF_KEYS):
        return None
    values = {k: cfg[k] for k in RANGES if k in cfg and cfg[k] is not None}
    if cfg.get("do_sample") is not True:  # transformers: greedy unless do_sample is true
        rp = {"repetition_penalty": values["repetition_penalty"]} if "repetition_penalty" in values else {}
        return _build({**rp, "temperature": 0.0}, TRANSFORMERS, "generation_config.json (do_sample false: greedy)")
    return _build(values, TRANSFORMERS, "generation_config.json")


def from_gguf_metadata(metadata: dict) -> SamplingDefaults | None:
    values = {name: metadata[key] for key, name in GGUF_KEYS.items() if key in metadata}
    if not values:
        return None
    return _build(values, LLAMA_CPP, "GGUF general.sampling.* (llama.cpp defaults for the keys not given)")


def read_sampling_defaults(path: str | Path) -> SamplingDefaults:
    """The defaults for the model at a local path (a Hugging Face folder or a .gguf file)."""
    path = Path(path)
    found = None
    if path.is_dir():
        found = from_generation_config(path / "generation_config.json")
    elif path.is_file() and path.suffix.lower() == ".gguf":
        from llorch_cpud.formats.gguf import GGUFFile

        try:
            with GGUFFile.open(path) as f:
                found = from_gguf_metadata({k: v for k, v in f.metadata.items() if k.startswith("general.sampling.")})
        except Exception:  # noqa: BLE001 - the loader reports a broken file; here it only means no recommendation
            found = None
    return found or SamplingDefaults()
