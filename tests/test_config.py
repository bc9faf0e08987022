"""Config loading, overrides and the one-line errors of `loom train` before any worker starts."""

from __future__ import annotations

import time

import pytest

from launch.cli import main
from trainer.config import ConfigError, load_config

DEMO = "configs/train/demo.yaml"


def test_demo_config_resolves_section_files():
    cfg = load_config(DEMO)
    assert cfg.model.dim == 192 and cfg.cluster.workers == 2 and cfg.data.path == "data/stdlib"


def test_overrides_replace_sections_and_values():
    cfg = load_config(DEMO, ["model=tiny", "model.dim=96", "optim.lr=1e-3", "data.bucket_edges=[64,256,1024]"])
    assert cfg.model.dim == 96 and cfg.model.n_layers == 2  # tiny.yaml, then the dotted override
    assert cfg.optim.lr == pytest.approx(1e-3)  # "1e-3" is a string to YAML 1.1; still a float here
    assert cfg.data.bucket_edges == [64, 256, 1024]


@pytest.mark.parametrize("override, message", [
    (["model.dimm=3"], "unknown config key 'model.dimm' (did you mean 'model.dim'?)"),
    (["model.n_kv_heads=4"], "model.n_heads=6 is not divisible by model.n_kv_heads=4"),
    (["optim.lr=-1"], "optim.lr must be positive, got -1.0"),
    (["data.path="], "data.path is not set"),
    (["train.max_steps=ten"], "'train.max_steps' must be an integer, got 'ten'"),
    (["model.attention_backend=fast"], "unknown model.attention_backend 'fast'"),
    (["model=nosuch"], "'model: nosuch' names no file"),
    (["optim"], "override 'optim' is not of the form key=value"),
    (["checkpoint.folder=nosuch://bucket/run"], "unknown storage protocol 'nosuch://'"),
    (["train.activation_checkpointing=most"], "train.activation_checkpointing must be true, false, auto or a block count"),
    (["model.attention_backend=flash_attn"], "unknown model.attention_backend 'flash_attn'"),
])
def test_bad_values_raise_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, override)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    (["model.n_heads=4", "model.n_kv_heads=4", "model.dim=102"], "model.dim=102 is not divisible by model.n_heads=4"),
    (["data.path=/nonexistent/data"], "/nonexistent/data is not a prepared Loom dataset"),
    (["cluster.workers=3"], "train.global_microbatches=2 is not divisible by dp=3"),
    (["parallel.dp=4"], "layout dp=4 × pp=1 × tp=1 × sp=1 does not multiply to 2 workers"),
    (["checkpoint.folder=file:///tmp/x", "parallel.dp_engine=deepspeed"], "not a URL"),
])
def test_cli_train_rejects_bad_input_before_starting(override, message, capsys, small_dataset, tmp_path):
    t0 = time.time()
    code = main(["train", DEMO, f"data.path={small_dataset}", f"run_dir={tmp_path}", *override])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("loom: error: ") and message in err and err.count("\n") == 1
    assert time.time() - t0 < 5, "validation must not start a cluster"


def test_vocab_smaller_than_dataset_is_rejected(capsys, small_dataset, tmp_path):
    assert main(["train", DEMO, f"data.path={small_dataset}", f"run_dir={tmp_path}", "model.vocab_size=100"]) == 2
    assert "model.vocab_size=100 is smaller than the dataset's vocabulary (259, bytes)" in capsys.readouterr().err
