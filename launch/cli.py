"""The `loom` command: prepare, stats, train, submit / status / logs / stop, export, profile, plan.

Every mistake the user can make — a bad config, a missing dataset, an impossible layout — ends
in one `loom: error: …` line and exit status 2 before any worker starts.
"""

from __future__ import annotations

import argparse
import sys

from trainer.config import ConfigError, load_config


def _prepare(args: argparse.Namespace) -> None:
    from trainer.prepare import SourceOptions, prepare

    opts = SourceOptions(include=args.include or ["*"], exclude=args.exclude or [], text_key=args.text_key)
    manifest = prepare(args.src, args.out, args.tokenizer, opts, tokens_per_shard=args.tokens_per_shard,
                       force=args.force, show_progress=not args.quiet)
    skipped = ", ".join(f"{n} {k}" for k, n in manifest["skipped"].items()) or "none"
    if manifest.get("up_to_date"):
        print(f"{args.out}: up to date ({manifest['documents']:,} documents, {manifest['tokens']:,} tokens)")
        return
    print(f"{args.out}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "
          f"{len(manifest['shards'])} shard(s), {manifest['seconds']} s; skipped: {skipped}")


def _stats(args: argparse.Namespace) -> None:
    from trainer.stats import run_stats

    run_stats(args.data, as_json=args.json)


def _train(args: argparse.Namespace) -> None:
    from launch.ray_job import preflight, run_job
    from launch.run_lock import RunLease

    cfg = load_config(args.config, args.overrides)
    job = preflight(cfg)
    with RunLease(cfg.run_path):  # one job per run folder, for as long as this one runs
        print(f"loom train: {cfg.name} → {cfg.run_path}", flush=True)
        summary = run_job(cfg, job)[0]
    print(describe_run(summary))


def describe_run(s: dict) -> str:
    if not s["losses"]:
        return f"nothing to do: the run is complete ({s['step']}/{s['max_steps']} steps)"
    text = (f"trained steps {s['start_step'] + 1}–{s['step']} of {s['max_steps']}: loss {s['losses'][0]:.4f} → "
            f"{s['losses'][-1]:.4f}; loss curve {s['loss_plot']}")
    if s["step"] < s["max_steps"]:
        text += f"\nstopped after train.run_steps; the same command resumes at step {s['step']}"
    return text


def _submit(args: argparse.Namespace) -> None:
    from launch.submit import submit
    from trainer.job import check_dataset, check_layout, check_pretrained

    cfg = load_config(args.config, args.overrides)
    check_dataset(cfg)
    check_pretrained(cfg)
    check_layout(cfg)  # the device-dependent checks run on the cluster, where its devices are known
    submit(cfg, args.address, wait=not args.no_wait, python=args.python)


def _job(args: argparse.Namespace) -> None:
    from launch import submit as jobs

    if args.command == "status":
        jobs.status(args.job, args.address)
    elif args.command == "logs":
        jobs.logs(args.job, args.address, args.follow)
    else:
        jobs.stop(args.job, args.address)


def _export(args: argparse.Namespace) -> None:
    from trainer.export import export

    export(args.run_dir, args.out, args.dtype)


def _profile(args: argparse.Namespace) -> None:
    from trainer.profile import run_profile

    cfg = load_config(args.config, args.overrides)
    run_profile(cfg, args.lengths, args.out)


def _plan(args: argparse.Namespace) -> None:
    from trainer.plan import run_plan

    cfg = load_config(args.config, args.overrides)
    run_plan(cfg, args.data, args.out, args.top)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="Long-context training on uneven sequences.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize text into Arrow shards")
    p.add_argument("src", help="a folder of text files, a text file, a .jsonl or a .parquet file")
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' (default), a tokenizer.json, or a model folder "
                                                         "(its tokenizer, special tokens and chat template)")
    p.add_argument("--include", action="append", help="glob of files to take from a folder (repeatable)")
    p.add_argument("--exclude", action="append", help="glob of relative paths to skip (repeatable)")
    p.add_argument("--text-key", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("--tokens-per-shard", type=int, default=64 * 2**20)
    p.add_argument("--force", action="store_true", help="replace an existing dataset prepared from other input")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)

    s = sub.add_parser("stats", help="length statistics of a prepared dataset")
    s.add_argument("data")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_stats)

    t = sub.add_parser("train", help="train on an embedded local Ray cluster (or cluster.address)")
    t.add_argument("config", help="train config YAML")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3")
    t.set_defaults(func=_train)

    sb = sub.add_parser("submit", help="run a train config on an existing Ray cluster (Ray Jobs API)")
    sb.add_argument("config")
    sb.add_argument("overrides", nargs="*", help="key=value overrides")
    sb.add_argument("--address", required=True, help="the cluster's dashboard address, e.g. http://HEAD:8265")
    sb.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    sb.add_argument("--python", default="python", help="the interpreter on the cluster")
    sb.set_defaults(func=_submit)
    for name, text in (("status", "a submitted job's state"), ("logs", "a submitted job's output"),
                       ("stop", "stop a submitted job")):
        j = sub.add_parser(name, help=text)
        j.add_argument("job", help="the id `loom submit` printed")
        j.add_argument("--address", required=True)
        if name == "logs":
            j.add_argument("--follow", action="store_true")
        j.set_defaults(func=_job)

    e = sub.add_parser("export", help="the newest checkpoint as a Hugging Face model folder (safetensors)")
    e.add_argument("run_dir", help="a run folder (runs/NAME)")
    e.add_argument("out", help="output folder for model.safetensors and config.json")
    e.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16; auto: the dtype of model.init_from "
                                                    "(float32 without one)")
    e.set_defaults(func=_export)

    f = sub.add_parser("profile", help="fit the cost model's coefficients on this machine's device")
    f.add_argument("config", help="train config YAML (its model is what gets timed)")
    f.add_argument("overrides", nargs="*", help="key=value overrides")
    f.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096],
                   help="single-document lengths to time")
    f.add_argument("--out", default="profile.json")
    f.set_defaults(func=_profile)

    pl = sub.add_parser("plan", help="choose the parallel layout from the corpus's length statistics")
    pl.add_argument("config", help="train config YAML: model, cluster (nodes, workers, profile), batch size")
    pl.add_argument("data", help="a prepared dataset folder or its stats.json")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. cluster.nodes=8 cluster.workers=64")
    pl.add_argument("--out", default="plan", help="folder for plan.yaml, plan.png, candidates.jsonl")
    pl.add_argument("--top", type=int, default=15, help="rows of the table")
    pl.set_defaults(func=_plan)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is written for the user: one line, exit status 2."""
    from launch.errors import PlacementError, WorkerDied
    from parallel.planner.adaptive import SequenceTooLong
    from parallel.process_group import CollectiveTimeout
    from trainer.checkpoint import CheckpointError
    from trainer.dataset import DatasetError
    from trainer.engine import NonFiniteError
    from trainer.prepare import PrepareError

    return (ConfigError, PrepareError, DatasetError, CheckpointError, NonFiniteError, FileNotFoundError,
            PlacementError, SequenceTooLong, CollectiveTimeout, WorkerDied)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow the options (`loom submit CONFIG --address A k=v`)
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("loom: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - those written for the user become one line, the rest re-raise
        from launch.errors import WorkerError

        if not isinstance(err, (*user_errors(), WorkerError)):
            raise
        print(f"loom: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, WorkerError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
