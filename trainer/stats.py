"""`loom stats`: the length distribution of a prepared dataset — table, JSON and a PNG histogram."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from trainer.dataset import open_shard, read_manifest


def read_lengths(folder: str | Path) -> np.ndarray:
    """Document lengths from the `length` column of every shard (the token lists are not read)."""
    folder = Path(folder)
    parts = []
    for shard in read_manifest(folder)["shards"]:
        source, reader = open_shard(folder, shard)
        with source:
            parts.append(reader.read_all().select(["length"]).column("length").to_numpy())
    return np.concatenate(parts).astype(np.int64)


def power_of_two_edges(max_len: int, smallest: int = 64) -> list[int]:
    """Bucket upper edges 64, 128, ... up to the first power of two >= max_len."""
    edges = [smallest]
    while edges[-1] < max_len:
        edges.append(edges[-1] * 2)
    return edges


def length_stats(lengths: np.ndarray, edges: list[int] | None = None) -> dict[str, Any]:
    edges = edges or power_of_two_edges(int(lengths.max()))
    bucket = np.searchsorted(np.asarray(edges), lengths, side="left")
    total = int(lengths.sum())
    buckets = []
    lower = 0
    for i, upper in enumerate(edges):
        inside = lengths[bucket == i]
        buckets.append({"min": lower + 1, "max": upper, "documents": int(inside.size),
                        "tokens": int(inside.sum()), "token_frac": float(inside.sum() / total)})
        lower = upper
    pct = np.percentile(lengths, [50, 90, 99])
    return {
        "documents": int(lengths.size),
        "tokens": total,
        "min": int(lengths.min()),
        "mean": float(lengths.mean()),
        "median": float(pct[0]),
        "p90": float(pct[1]),
        "p99": float(pct[2]),
        "max": int(lengths.max()),
        "buckets": [b for b in buckets if b["documents"]],
    }


def dataset_stats(folder: str | Path, lengths: np.ndarray | None = None) -> dict[str, Any]:
    manifest = read_manifest(folder)
    stats = length_stats(read_lengths(folder) if lengths is None else lengths)
    stats["skipped"] = manifest.get("skipped", {})
    stats["tokenizer"] = manifest["tokenizer"]["name"]
    stats["supervised_tokens"] = int(manifest.get("supervised_tokens", stats["tokens"]))
    return stats


def render_table(stats: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=title, show_header=False, box=None)
    for key in ("documents", "tokens", "min", "median", "p90", "p99", "max"):
        summary.add_row(key, f"{stats[key]:,.0f}")
    skipped = ", ".join(f"{n} {k}" for k, n in stats["skipped"].items()) or "none"
    summary.add_row("skipped", skipped)
    if stats["supervised_tokens"] != stats["tokens"]:
        share = stats["supervised_tokens"] / max(stats["tokens"], 1)
        summary.add_row("supervised", f"{stats['supervised_tokens']:,} tokens ({share:.1%}; the rest are prompts)")
    console.print(summary)
    table = Table(title="tokens per length bucket")
    for col in ("length", "documents", "tokens", "% tokens"):
        table.add_column(col, justify="right")
    for b in stats["buckets"]:
        table.add_row(f"{b['min']:,}–{b['max']:,}", f"{b['documents']:,}", f"{b['tokens']:,}",
                      f"{100 * b['token_frac']:.1f}")
    console.print(table)


def plot_histogram(lengths: np.ndarray, path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.logspace(0, np.log10(max(2, lengths.max())) + 0.01, 60)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(lengths, bins=bins, color="#4c72b0", alpha=0.85, label="documents")
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens, log scale)")
    ax.set_ylabel("documents")
    twin = ax.twinx()
    twin.hist(lengths, bins=bins, weights=lengths, histtype="step", color="#dd8452", lw=2, label="tokens")
    twin.set_ylabel("tokens")
    for q, style in ((50, ":"), (90, "--"), (99, "-.")):
        ax.axvline(np.percentile(lengths, q), color="gray", ls=style, lw=1, label=f"p{q}")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_stats(folder: str | Path, as_json: bool = False) -> dict[str, Any]:
    """Computes the stats, writes stats.json and lengths.png next to the data, prints them."""
    folder = Path(folder)
    lengths = read_lengths(folder)
    stats = dataset_stats(folder, lengths)
    (folder / "stats.json").write_text(json.dumps(stats, indent=2))
    plot_histogram(lengths, folder / "lengths.png", f"{folder.name}: document lengths")
    if as_json:
        print(json.dumps(stats))
    else:
        render_table(stats, f"{folder.name} ({stats['tokenizer']} tokens)")
        print(f"histogram: {folder / 'lengths.png'}")
    return stats
