"""Bad config.json values: one-line ModelLoadError naming the file and the field, before anything is allocated."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from llorch_cpud.errors import ModelLoadError

CASES = [  # (config change, field named in the error)
    ({"n_layer": "two"}, "n_layer"),
    ({"n_head": 0}, "n_head"),
    ({"n_layer": 100_000_000}, "n_layer"),
    ({"n_embd": 10**12}, "n_embd"),
    ({"vocab_size": 1e9}, "vocab_size"),
    ({"n_positions": -1}, "n_positions"),
    ({"n_embd": True}, "n_embd"),
    ({"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon"),
    ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon"),
    ({"activation_function": 7}, "activation_function"),
    ({"n_inner": 0}, "n_inner"),
]


def with_config(src, dst, change=None, raw=None):
    shutil.copytree(src, dst)
    cfg = dst / "config.json"
    if raw is not None:
        cfg.write_text(raw)
    else:
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **change}))
    return dst


@pytest.mark.parametrize("change,field", CASES)
def test_bad_value_is_one_error_naming_file_and_field(gpt2_small, tmp_path, change, field):
    from llorch_cpud.formats import load_model

    folder = with_config(gpt2_small, tmp_path / "m", change)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder))
    msg = str(e.value)
    assert msg.startswith(str(folder / "config.json") + ": " + field + " must be"), msg
    assert "\n" not in msg and time.perf_counter() - t0 < 5


@pytest.mark.parametrize("raw,expect", [("[1, 2]", "expected a JSON object, got list"), ("{", "not valid JSON"),
                                        ('{"n_layer": ' + "9" * 5000 + "}", "not valid JSON")])
def test_config_not_an_object(gpt2_small, tmp_path, raw, expect):
    from llorch_cpud.formats import load_model

    folder = with_config(gpt2_small, tmp_path / "m", raw=raw)
    with pytest.raises(ModelLoadError, match=expect):
        load_model(str(folder))


def test_good_values_still_load_and_layer_count_is_checked_against_the_file(gpt2_small, tmp_path):
    from llorch_cpud.formats import load_model

    load_model(str(with_config(gpt2_small, tmp_path / "ok", {"n_inner": None, "layer_norm_epsilon": 1e-5})))
    with pytest.raises(ModelLoadError, match="h.2.ln_1.weight' missing"):  # in range, but not what the file holds
        load_model(str(with_config(gpt2_small, tmp_path / "three", {"n_layer": 3})))


def test_cli_prints_one_line_not_a_traceback(gpt2_small, tmp_path):
    folder = with_config(gpt2_small, tmp_path / "m", {"n_layer": "two"})
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "generate", "--model", str(folder), "hi"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {folder / 'config.json'}: n_layer must be an integer in [1, 1024], got 'two'"]
