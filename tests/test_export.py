"""`loom export`: a checkpoint of a two-rank run, loaded by transformers, gives Loom's logits."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.distributed import run_ranks
from tests.test_training import train_rank
from launch.cli import main
from trainer.config import load_config
from trainer.export import load_model_state
from trainer.checkpoint import complete_checkpoints


def test_export_loads_in_transformers_with_the_same_logits(small_dataset, tmp_path):
    transformers = pytest.importorskip("transformers")
    ov = tiny_overrides(small_dataset, tmp_path) + ["train.max_steps=3", "checkpoint.every=3", "name=run",
                                                    "parallel.sp.degree=2"]
    run_ranks(train_rank, 2, ov)  # a sequence-parallel layout: the export reassembles it
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()

    from parallel.attention import LocalAttention, select_backend
    from trainer.model import Transformer

    cfg = load_config(tmp_path / "run" / "config.yaml")
    ours = Transformer(cfg.model)
    state = load_model_state(complete_checkpoints(tmp_path / "run" / "checkpoints")[-1][1])
    ours.load_state_dict(state)
    tokens = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 200], dtype=torch.int32)
    with torch.no_grad():
        want = ours(tokens, torch.arange(200), LocalAttention(select_backend("math", "cpu"), cu, 200))
        got = hf(tokens[None]).logits[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_export_refuses_models_without_a_hugging_face_equivalent(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {layer_pattern: LS}\ndata: {path: x}\n")
    assert main(["export", str(run), str(tmp_path / "hf")]) == 2
    assert "linear-attention layers have no Hugging Face equivalent" in capsys.readouterr().err
