"""Loading Hugging Face GPT-2 folders: safetensors single and sharded, and every way it can go wrong."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llorch_cpud.errors import ModelLoadError
from llorch_cpud.formats import load_model, load_tokenizer, resolve
from llorch_cpud.formats.hub import looks_like_hub_name


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_single_and_sharded(gpt2_small, gpt2_medium_ish):
    m, tok, _ = load_model(str(gpt2_small))
    assert m.config.n_layer == 2 and m.dense("h.0.attn.c_attn.weight").shape == (64, 192)
    assert all(m.dense(n).dtype == np.float32 for n in m.tensors())
    m2, _, _ = load_model(str(gpt2_medium_ish))
    assert m2.config.n_layer == 4 and m2.n_ctx == 64
    assert "h.0.attn.bias" not in m2.tensors()  # buffers are dropped


def test_tokenizer_alone_is_the_models_and_can_be_handed_to_the_loader(gpt2_small, smollm2_gguf, tmp_path):
    text = "Hello, world! Ünïcode and  spaces."
    for spec in (str(gpt2_small), str(smollm2_gguf)):
        _, tok, _ = load_model(spec)
        alone = load_tokenizer(spec)
        assert alone.encode(text) == tok.encode(text) and alone.eos_token_id == tok.eos_token_id
        _, handed, _ = load_model(spec, tokenizer=alone)
        assert handed is alone  # the loader does not build a second one
    with pytest.raises(ModelLoadError, match="not a model folder or a .gguf file"):
        load_tokenizer(str(tmp_path / "x.txt") if (tmp_path / "x.txt").write_text("x") else None)


def test_weights_equal_transformers_state_dict(gpt2_small):
    torch = pytest.importorskip("torch")
    from transformers import GPT2LMHeadModel

    ref = GPT2LMHeadModel.from_pretrained(gpt2_small).transformer.state_dict()
    m, _, _ = load_model(str(gpt2_small))
    assert set(m.tensors()) == set(ref)  # every checkpoint tensor has its field
    for name in m.tensors():  # packed or not, the values are the checkpoint's exactly
        assert np.array_equal(m.dense(name), ref[name].numpy()), name
    assert isinstance(torch.__version__, str)


def test_pickle_only_folder_is_refused(gpt2_small, tmp_path):
    d = copy(gpt2_small, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match=r"pytorch_model.bin: pickle checkpoints are refused"):
        load_model(str(d))


def test_missing_config(gpt2_small, tmp_path):
    d = copy(gpt2_small, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config.json: missing"):
        load_model(str(d))


def test_corrupt_safetensors_names_the_file(gpt2_small, tmp_path):
    d = copy(gpt2_small, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model.safetensors: tensor 'transformer.wte.weight': .* truncated or corrupt"):
        load_model(str(d))


def test_missing_tensor_and_wrong_shape(gpt2_small, tmp_path):
    d = copy(gpt2_small, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_layer"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"tensor 'h.2.ln_1.weight' missing"):
        load_model(str(d))
    cfg["n_layer"], cfg["n_embd"] = 2, 32
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"has shape"):
        load_model(str(d))


def test_missing_tokenizer(gpt2_small, tmp_path):
    d = copy(gpt2_small, tmp_path / "m")
    (d / "merges.txt").unlink()
    with pytest.raises(ModelLoadError, match=r"merges.txt: missing"):
        load_model(str(d))


def test_missing_shard(gpt2_medium_ish, tmp_path):
    d = copy(gpt2_medium_ish, tmp_path / "m")
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002.safetensors: shard listed"):
        load_model(str(d))


def test_nonexistent_path():
    with pytest.raises(ModelLoadError, match=r"no such file or folder"):
        load_model("./does/not/exist")


def test_hub_name_detection():
    assert looks_like_hub_name("openai-community/gpt2-medium")
    assert looks_like_hub_name("gpt2")
    assert not looks_like_hub_name("model.gguf")


def test_hub_name_resolves_from_the_hugging_face_cache(gpt2_small, tmp_path, monkeypatch):
    """The real hub path up to the network: a model already in the HF cache loads by its hub name."""
    repo = tmp_path / "hub" / "models--someone--tiny-gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(gpt2_small, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    path = resolve("someone/tiny-gpt2")
    assert path == repo / "snapshots" / commit
    m, tok, name = load_model("someone/tiny-gpt2")
    assert name == "someone/tiny-gpt2" and m.config.n_layer == 2


def test_hub_name_without_network_is_one_clear_line(tmp_path):
    """No network here: the CLI ends with one line naming the model, not a traceback."""
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "generate", "--model", "openai-community/gpt2-medium", "hi"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: openai-community/gpt2-medium:"), r.stderr
    assert "Traceback" not in r.stderr
