"""Every parallel layout against one process, resuming onto another layout, and bad layouts.

Tolerance: losses of 3 steps within rtol 1e-6 of the single-process run (fp32; the layouts only
change the order of sums — seen here: ≤ 1.2e-7). Layouts of one world size run in one process group.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.distributed import run_ranks
from tests.test_training import train_rank
from launch.cli import main

MEMORY_SAVING = ["train.activation_checkpointing=true", "train.keep_attention=true", "train.mlp_tile_tokens=96",
                 "train.offload_activations=true", "optim.offload=true"]
LAYOUTS = {
    2: {"dp2": ["parallel.dp=2"], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "sp2": ["parallel.sp.degree=2"],
        # every block recomputed keeping its attention output, the SwiGLU in tiles of 96 of a rank's 256 tokens,
        # the blocks' inputs and AdamW's moments in host memory
        "tp2 kept tiled offloaded": ["parallel.tp=2", *MEMORY_SAVING],
        "sp2 ulysses kept tiled offloaded": ["parallel.sp.degree=2", "parallel.sp.method=ulysses", *MEMORY_SAVING]},
    4: {"dp2·tp2": ["parallel.dp=2", "parallel.tp=2"], "tp2·pp2": ["parallel.tp=2", "parallel.pp=2"],
        "dp2·sp2": ["parallel.dp=2", "parallel.sp.degree=2"], "tp2·sp2": ["parallel.tp=2", "parallel.sp.degree=2"],
        "pp2·sp2": ["parallel.pp=2", "parallel.sp.degree=2"]},
    8: {"dp2·tp2·pp2": ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2"]},
}


def base(dataset, run_dir) -> list[str]:
    return tiny_overrides(dataset, run_dir) + ["train.max_steps=3", "checkpoint.every=100", "model.n_layers=4",
                                               "train.global_microbatches=4"]


def several_layouts(rank: int, world: int, runs: dict[str, list[str]]) -> dict[str, list[float]]:
    return {name: train_rank(rank, world, overrides)[0]["losses"] for name, overrides in runs.items()}


def check_world(world: int, dataset, tmp_path) -> None:
    ov = base(dataset, tmp_path)
    (reference, _), = run_ranks(train_rank, 1, ov + ["name=reference"])
    runs = {name: ov + [f"name={name}", *extra] for name, extra in LAYOUTS[world].items()}
    losses = run_ranks(several_layouts, world, runs)[0]
    for name in LAYOUTS[world]:
        torch.testing.assert_close(torch.tensor(losses[name]), torch.tensor(reference["losses"]), rtol=1e-6, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_two_rank_layouts_equal_one_process(small_dataset, tmp_path):
    check_world(2, small_dataset, tmp_path)


@pytest.mark.slow
def test_four_rank_layouts_equal_one_process(small_dataset, tmp_path):
    check_world(4, small_dataset, tmp_path)


@pytest.mark.slow
def test_eight_rank_layout_equals_one_process(small_dataset, tmp_path):
    check_world(8, small_dataset, tmp_path)


@pytest.mark.slow
def test_interleaved_1f1b_equals_one_process(small_dataset, tmp_path):
    ov = base(small_dataset, tmp_path)
    (reference, _), = run_ranks(train_rank, 1, ov + ["name=reference"])
    (got, _), _ = run_ranks(train_rank, 2, ov + ["name=interleaved", "parallel.pp=2",
                                                 "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual=2"])
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_resume_onto_other_layouts_continues_the_loss(small_dataset, tmp_path):
    """Saved by dp2·tp2 (4 ranks) at step 2, resumed by pp2 (2 ranks) to step 4, then by one process
    to step 6: the losses follow one uninterrupted single-process run."""
    ov = tiny_overrides(small_dataset, tmp_path) + ["train.max_steps=6", "checkpoint.every=2", "model.n_layers=4",
                                                    "train.global_microbatches=4"]
    (reference, _), = run_ranks(train_rank, 1, ov + ["name=reference"])
    phases = [(4, ["parallel.dp=2", "parallel.tp=2"]), (2, ["parallel.pp=2"]), (1, [])]
    losses = []
    for i, (world, layout) in enumerate(phases):
        result = run_ranks(train_rank, world, ov + ["name=moving", "train.run_steps=2", *layout])[0][0]
        assert result["start_step"] == 2 * i
        losses += result["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_deepspeed_zero_stages_equal_one_process(small_dataset, tmp_path, monkeypatch):
    """ZeRO 1, 2 and 3 on two ranks (DeepSpeed owns optimizer, schedule and clipping), and a ZeRO-3
    run resumed from DeepSpeed's checkpoint inside Loom's, against one FSDP process."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    ov = base(small_dataset, tmp_path) + ["train.max_steps=6", "checkpoint.every=3"]
    (reference, _), = run_ranks(train_rank, 1, ov + ["name=reference"])
    runs = {f"zero{s}": ov + [f"name=zero{s}", "parallel.dp_engine=deepspeed", f"parallel.zero_stage={s}"]
            for s in (1, 2, 3)}
    runs["zero3-part1"] = ov + ["name=zero3r", "parallel.dp_engine=deepspeed", "parallel.zero_stage=3",
                                "train.run_steps=3"]
    runs["zero3-part2"] = ov + ["name=zero3r", "parallel.dp_engine=deepspeed", "parallel.zero_stage=3"]
    losses = run_ranks(several_layouts, 2, runs)[0]
    for stage in (1, 2, 3):
        torch.testing.assert_close(torch.tensor(losses[f"zero{stage}"]), torch.tensor(reference["losses"]),
                                   rtol=1e-5, atol=0)
    resumed = losses["zero3-part1"] + losses["zero3-part2"]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)


def test_deepspeed_settings_of_the_user_are_kept():
    from trainer.config import load_config
    from trainer.engine import ds_config

    cfg = load_config("configs/train/demo.yaml", ["parallel.dp_engine=deepspeed", "parallel.zero_stage=3",
                                                  "parallel.deepspeed={zero_optimization: {offload_optimizer: {device: cpu}}}",
                                                  "optim.grad_clip=0.5"])
    ds = ds_config(cfg, microbatches_per_rank=4, bf16=False)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("override, message", [
    (["cluster.workers=2", "parallel.dp_engine=deepspeed", "parallel.tp=2"], "parallel.dp_engine=deepspeed runs data parallelism only"),
    (["cluster.workers=4", "parallel.tp=3"], "4 workers cannot hold pp=1 × tp=3 × sp=1"),
    (["cluster.workers=4", "parallel.tp=4"], "model.n_kv_heads=2 is not divisible by tp=4"),
    (["cluster.workers=2", "parallel.pp=2", "model.n_layers=3"], "model.n_layers=3 is not divisible by pp × pp_virtual = 2 stages"),
    (["cluster.workers=2", "parallel.pp=2", "train.global_microbatches=1"], "pp=2 needs at least pp micro-batches per data-parallel rank"),
    (["cluster.workers=4", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], "interleaved_1f1b needs parallel.pp_virtual >= 2"),
])
def test_bad_layouts_are_rejected_before_start(override, message, capsys, small_dataset, tmp_path):
    code = main(["train", "configs/train/demo.yaml", f"data.path={small_dataset}", f"run_dir={tmp_path}", "model=tiny",
                 *override])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
