"""Pretrained models: Hugging Face folders in (any family, RoPE scaling, layout), out again, and
instruction data whose loss sees only the answers.

Oracles: `transformers` itself — its logits for the same weights and tokens, its RoPE frequencies,
its chat-template assistant mask — and the single-process run for parallel layouts.
Tolerances (fp32): logits within 1e-5 absolute (seen: ≤ 4e-7); losses of a layout against one process rtol 1e-5.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from tests.distributed import run_ranks
from tests.test_training import job_for
from launch.cli import main
from trainer.config import ConfigError, load_config
from trainer.hf import hf_state_dict, load_pretrained
from trainer.loss import IGNORE
from trainer.model import Transformer

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
LINEAR = {"rope_type": "linear", "factor": 2.0}
CASES = {  # name → (config class, its extra settings)
    "llama": ("LlamaConfig", {}),
    "llama-tied-llama3": ("LlamaConfig", {"tie_word_embeddings": True, "rope_theta": 50000.0, "rope_scaling": LLAMA3}),
    "llama-yarn": ("LlamaConfig", {"rope_scaling": YARN}),
    "mistral-window": ("MistralConfig", {"sliding_window": 48}),
    "qwen2-bias-linear": ("Qwen2Config", {"rope_scaling": LINEAR, "tie_word_embeddings": False}),
    "qwen3-head-dim": ("Qwen3Config", {"head_dim": 32, "tie_word_embeddings": False}),
}


def hf_model(kind: str, folder: Path, dtype: torch.dtype = torch.float32):
    """A random tiny Hugging Face model of one case, saved in `folder`; returned in eval mode, fp32."""
    cls, extra = CASES[kind]
    config = getattr(transformers, cls)(**SHAPE, **copy.deepcopy(extra))  # transformers edits what it is given
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, cls.replace("Config", "ForCausalLM"))(config)
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(folder)
    return model.float().eval()


def loom_model(folder: Path, *overrides: str) -> Transformer:
    cfg = load_config(None, ["data.path=x", f"model.init_from={folder}", *overrides])
    model = Transformer(cfg.model)
    load_pretrained([model], folder, cfg.model.tie_embeddings)
    return model.eval()


def packed_logits(model: Transformer, docs: list[torch.Tensor]) -> torch.Tensor:
    from parallel.attention import LocalAttention, select_backend

    lengths = [d.numel() for d in docs]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    mixer = LocalAttention(select_backend("math", "cpu"), cu, max(lengths), window=model.cfg.window)
    with torch.no_grad():
        return model(torch.cat(docs), positions, mixer)


@pytest.mark.parametrize("kind", list(CASES))
def test_an_imported_model_gives_the_logits_of_transformers(kind, tmp_path):
    """Two documents packed in one stream (positions restart) against transformers one by one;
    100 and 140 tokens reach past the window (48) and the RoPE scalings' original context (64)."""
    reference = hf_model(kind, tmp_path)
    ours = loom_model(tmp_path)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 259, (n,), generator=g) for n in (100, 140)]
    got = packed_logits(ours, docs)
    with torch.no_grad():
        want = torch.cat([reference(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scaling", [{}, LINEAR, LLAMA3, YARN, {**YARN, "beta_fast": 16, "attention_factor": 1.2}])
def test_rope_frequencies_are_those_of_transformers(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from trainer.rope import frequencies

    config = transformers.LlamaConfig(**SHAPE, rope_theta=20000.0, rope_scaling=dict(scaling) or None)
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        want, factor = 1.0 / 20000.0 ** (torch.arange(0, 16, 2).float() / 16), 1.0
    else:
        want, factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    got, got_factor = frequencies(16, 20000.0, dict(scaling))
    torch.testing.assert_close(got, want.float(), atol=0, rtol=1e-6)
    assert got_factor == pytest.approx(factor)


def test_export_of_an_imported_model_is_the_same_file(tmp_path):
    """Names, tying and dtype survive the trip: bf16 in, bf16 out, every tensor identical."""
    hf_model("llama-tied-llama3", tmp_path, torch.bfloat16)
    original = load_file(tmp_path / "model.safetensors")
    model = loom_model(tmp_path)
    assert model.output.weight is model.tok_embeddings.weight
    back = hf_state_dict(model.state_dict(), tied=True, dtype=torch.bfloat16)
    assert set(back) == set(original) and "lm_head.weight" not in back
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_config_takes_the_shape_of_the_folder_and_refuses_what_does_not_fit(tmp_path):
    hf_model("qwen3-head-dim", tmp_path)
    cfg = load_config(None, ["data.path=x", f"model.init_from={tmp_path}"])
    m = cfg.model
    assert (m.family, m.dim, m.n_heads, m.n_kv_heads, m.head_dim, m.qk_norm, m.attention_bias) == \
        ("qwen3", 64, 4, 2, 32, True, False)
    with pytest.raises(ConfigError, match="model.dim=128 disagrees"):
        load_config(None, ["data.path=x", f"model.init_from={tmp_path}", "model.dim=128"])
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(None, ["data.path=x", f"model.init_from={tmp_path / 'nowhere'}"])
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel is not supported"):
        load_config(None, ["data.path=x", f"model.init_from={tmp_path}"])
    with pytest.raises(ConfigError, match="unknown type 'dynamic'"):
        load_config(None, ["data.path=x", "model.rope_scaling={rope_type: dynamic, factor: 2}"])


def test_a_context_extension_overrides_the_folders_rope(tmp_path):
    """`model.rope_scaling` set beside `init_from` wins; the weights are the folder's all the same."""
    hf_model("llama", tmp_path)
    cfg = load_config(None, ["data.path=x", f"model.init_from={tmp_path}",
                             "model.rope_scaling={rope_type: yarn, factor: 4.0, original_max_position_embeddings: 64}"])
    assert cfg.model.rope_scaling["rope_type"] == "yarn"


# ------------------------------------------------------------------ instruction data


def write_pairs(path: Path, rows: int = 40) -> list[dict]:
    rng = np.random.default_rng(0)
    words = "the a model token context long sequence ring attention layer shard gradient".split()
    examples = [{"prompt": " ".join(rng.choice(words, rng.integers(3, 30))) + "?",
                 "completion": " " + " ".join(rng.choice(words, rng.integers(5, 60)))} for _ in range(rows)]
    bad = [{"prompt": "fine", "completion": 3}]  # not a string: skipped, counted
    path.write_text("".join(json.dumps(r) + "\n" for r in examples + bad))
    return examples


@pytest.fixture(scope="module")
def pairs_dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    from trainer.prepare import prepare

    folder = tmp_path_factory.mktemp("sft")
    examples = write_pairs(folder / "pairs.jsonl")
    manifest = prepare(folder / "pairs.jsonl", folder / "data", show_progress=False)
    assert manifest["skipped"] == {"bad_example": 1}
    return folder / "data", examples


def test_a_packed_micro_batch_of_examples_has_the_loss_of_each_example_alone(pairs_dataset, tmp_path):
    """Loom's summed cross-entropy over a packed stream of 6 examples = Σ of transformers' losses of
    each example alone with its prompt labelled -100."""
    from trainer.dataset import TokenDataset
    from trainer.loader import build_batch
    from trainer.sampler import Piece

    data, examples = pairs_dataset
    dataset = TokenDataset(data)
    reference = hf_model("llama", tmp_path)
    ours = loom_model(tmp_path)
    pieces = [Piece(doc, 0, int(dataset.lengths[doc])) for doc in range(6)]
    batch = build_batch(dataset, pieces)
    from parallel.attention import LocalAttention, select_backend

    mixer = LocalAttention(select_backend("math", "cpu"), batch.cu_seqlens, batch.max_seqlen)
    with torch.no_grad():
        got = ours(batch.tokens, batch.positions, mixer, batch.labels)
    want, count = 0.0, 0
    for doc, example in enumerate(examples[:6]):
        prompt = len(example["prompt"].encode())
        ids = torch.from_numpy(dataset.tokens(doc).astype(np.int64))
        assert ids.numel() == prompt + len(example["completion"].encode()) + 1  # + end-of-text
        labels = ids.clone()
        labels[:prompt] = IGNORE
        with torch.no_grad():
            logits = reference(ids[None]).logits[0, :-1]
        want += torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=IGNORE, reduction="sum")
        count += int((labels[1:] != IGNORE).sum())
    assert batch.num_labels() == count
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)

    def gradients(batches) -> dict[str, torch.Tensor]:
        ours.zero_grad()
        for b in batches:
            mixer = LocalAttention(select_backend("math", "cpu"), b.cu_seqlens, b.max_seqlen)
            ours(b.tokens, b.positions, mixer, b.labels).backward()
        return {name: p.grad.clone() for name, p in ours.named_parameters()}

    packed = gradients([batch])
    alone = gradients([build_batch(dataset, [piece]) for piece in pieces])
    for name in packed:  # packing them equals training them one at a time (atol 1e-5 on summed losses)
        torch.testing.assert_close(packed[name], alone[name], atol=1e-5, rtol=1e-4, msg=name)


def test_stats_show_the_supervised_share(pairs_dataset, capsys):
    data, examples = pairs_dataset
    supervised = sum(len(e["completion"].encode()) + 1 for e in examples)
    assert json.loads((data / "index.json").read_text())["supervised_tokens"] == supervised
    assert main(["stats", str(data)]) == 0
    assert f"{supervised:,} tokens" in capsys.readouterr().out


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
          "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE trained here, with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    text = (Path(json.__file__).parent / "decoder.py").read_text().splitlines()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML}))
    return folder


CONVERSATIONS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a ring?"},
     {"role": "assistant", "content": "Ranks passing keys and values around."},
     {"role": "user", "content": "And a shard?"}, {"role": "assistant", "content": "One rank's part."}],
    [{"role": "user", "content": "def f(x): return x"}, {"role": "assistant", "content": "It returns x."}],
]


def test_chat_rows_supervise_exactly_the_assistant_tokens_transformers_marks(tmp_path):
    from trainer.dataset import TokenDataset
    from trainer.prepare import prepare

    folder = chat_tokenizer(tmp_path / "tok")
    rows = [{"messages": c} for c in CONVERSATIONS] + [{"messages": "not a list"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = prepare(tmp_path / "chat.jsonl", tmp_path / "data", str(folder), show_progress=False)
    assert manifest["skipped"] == {"bad_example": 1}
    dataset = TokenDataset(tmp_path / "data")
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    for doc, conversation in enumerate(CONVERSATIONS):
        want = reference.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
        assert dataset.tokens(doc).tolist() == want["input_ids"]
        mask = np.zeros(len(want["input_ids"]), dtype=bool)
        for a, b in dataset.supervised(doc):
            mask[a:b] = True
        assert mask.tolist() == [bool(v) for v in want["assistant_masks"]]


def test_chat_rows_without_a_template_stop_prepare(tmp_path, capsys):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n")
    assert main(["prepare", str(tmp_path / "chat.jsonl"), str(tmp_path / "data")]) == 2
    assert "need a tokenizer with a chat template" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------ layouts


def import_rank(rank: int, world: int, overrides: list[str], folder: str):
    """Every parameter this rank holds equals the file's (whole tensors reassembled), then two steps."""
    from trainer.hf import hf_name
    from trainer.loop import Trainer

    trainer = Trainer(job_for(overrides, world))
    file = load_file(Path(folder) / "model.safetensors")
    for part in trainer.parts:
        for name, param in part.named_parameters():
            key = hf_name(name)
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            expected = file["model.embed_tokens.weight"] if key not in file else file[key]
            assert torch.equal(full.detach().cpu(), expected), name
    return trainer.fit()["losses"]


ONE_PROCESS: dict[str, list[float]] = {}


@pytest.mark.parametrize("layout, kind", [pytest.param("dp2", "qwen3-head-dim", marks=pytest.mark.slow),
                                          pytest.param("tp2", "qwen3-head-dim", marks=pytest.mark.slow),
                                          ("tp2", "qwen2-bias-linear"), ("sp2", "qwen3-head-dim"),
                                          pytest.param("pp2", "qwen3-head-dim", marks=pytest.mark.slow),
                                          pytest.param("adaptive", "qwen3-head-dim", marks=pytest.mark.slow)])
def test_every_layout_starts_from_the_same_pretrained_weights(layout, kind, pairs_dataset, tmp_path):
    """Qwen3 (q/k norms, head_dim 32) and Qwen2 (q/k/v biases) on instruction data: the parameters
    each rank holds are the file's, and two steps give one process's losses (rtol 1e-5)."""
    data, _ = pairs_dataset
    hf_model(kind, tmp_path / "hf")
    ov = [o for o in tiny_overrides(data, tmp_path) if o != "model=tiny"] + [f"model.init_from={tmp_path / 'hf'}", "train.max_steps=2",
                                           "checkpoint.every=100", "data.context_len=128"]
    extra = {"dp2": [], "tp2": ["parallel.tp=2"], "sp2": ["parallel.sp.degree=2"],
             "pp2": ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
             "adaptive": ["parallel.sp.degree=2", "parallel.sp.mode=adaptive"]}[layout]
    if kind not in ONE_PROCESS:  # the same weights (seeded) and data in every layout: one reference run each
        ONE_PROCESS[kind] = run_ranks(import_rank, 1, ov + ["name=one"], str(tmp_path / "hf"))[0]
    one = ONE_PROCESS[kind]
    two = run_ranks(import_rank, 2, ov + ["name=two", *extra], str(tmp_path / "hf"))[0]
    assert len(one) == 2
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)


# ------------------------------------------------------------------ bad input


def _train(tmp_path: Path, folder: Path, data: Path) -> int:
    config = tmp_path / "train.yaml"
    config.write_text(f"name: bad\nrun_dir: {tmp_path}\nmodel: {{init_from: {folder}}}\n"
                      f"data: {{path: {data}, context_len: 256, tokens_per_microbatch: 512}}\ncluster: {{workers: 1}}\n")
    return main(["train", str(config)])


def _damage(kind: str, folder: Path) -> str:
    """Damages a saved model folder one way; the words its error line must contain."""
    from safetensors.torch import save_file

    files = sorted(folder.glob("*.safetensors"))
    if kind == "missing shard":
        files[-1].unlink()
        return f"lacks {files[-1].name}"
    if kind == "truncated shard":
        files[0].write_bytes(files[0].read_bytes()[:-100])
        return "is truncated"
    if kind == "shape":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
        return "has shape (128, 64), the model's config.json gives (96, 64)"
    if kind == "dtype":
        for file in files:
            tensors = load_file(file)
            if "model.norm.weight" in tensors:
                tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
                save_file(tensors, file, metadata={"format": "pt"})
        return "model.norm.weight in"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing shard", "truncated shard", "shape", "dtype"])
def test_damaged_model_folders_are_one_line_before_any_worker(kind, small_dataset, tmp_path, capsys):
    hf = tmp_path / "hf"
    hf_model("llama", hf)
    transformers.AutoModelForCausalLM.from_pretrained(hf).save_pretrained(hf, max_shard_size="60KB")
    for stale in [hf / "model.safetensors"] if (hf / "model.safetensors.index.json").is_file() else []:
        stale.unlink(missing_ok=True)
    assert len(list(hf.glob("*.safetensors"))) > 1
    words = _damage(kind, hf)
    capsys.readouterr()
    assert _train(tmp_path, hf, small_dataset) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loom: error: model.init_from:") and words in err and "\n" not in err
    assert not (tmp_path / "bad").exists()


def test_a_tokenizer_larger_than_the_model_is_refused(small_dataset, tmp_path, capsys):
    """The byte corpus has 259 token ids; a pretrained model with 200 cannot embed them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**{**SHAPE, "vocab_size": 200})).save_pretrained(tmp_path / "hf")
    assert _train(tmp_path, tmp_path / "hf", small_dataset) == 2
    assert "model.vocab_size=200 is smaller than the dataset's vocabulary (259" in capsys.readouterr().err


def test_a_sharded_folder_loads_like_one_file(tmp_path):
    reference = hf_model("qwen2-bias-linear", tmp_path / "one")
    reference.save_pretrained(tmp_path / "many", max_shard_size="60KB")
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    one, many = loom_model(tmp_path / "one"), loom_model(tmp_path / "many")
    for (name, a), (_, b) in zip(one.state_dict().items(), many.state_dict().items()):
        assert torch.equal(a, b), name


def test_an_extended_model_exports_with_its_new_rope(small_dataset, tmp_path, capsys):
    """Import, one step with a YaRN override, export: transformers loads the folder (its RoPE scaling
    and the tokenizer files of the import) with the logits of Loom's checkpoint; OUT is never reused."""
    from tests.test_training import train_rank
    from trainer.checkpoint import complete_checkpoints
    from trainer.export import load_model_state

    hf_model("llama-tied-llama3", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    ov = [o for o in tiny_overrides(small_dataset, tmp_path) if o != "model=tiny"] + [
        f"model.init_from={tmp_path / 'hf'}", "model.rope_scaling={rope_type: yarn, factor: 4.0, "
        "original_max_position_embeddings: 64}", "train.max_steps=1", "checkpoint.every=1", "name=run"]
    run_ranks(train_rank, 1, ov)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["rope_scaling"]["rope_type"] == "yarn" and (tmp_path / "out" / "tokenizer_config.json").is_file()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    cfg = load_config(tmp_path / "run" / "config.yaml")
    ours = Transformer(cfg.model)
    ours.load_state_dict(load_model_state(complete_checkpoints(tmp_path / "run" / "checkpoints")[-1][1]))
    doc = torch.randint(0, 259, (150,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference(doc[None]).logits[0]
    torch.testing.assert_close(packed_logits(ours.eval(), [doc]), want, atol=1e-5, rtol=0)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
