"""The data pipeline at scale: prepare throughput, cache hits, and training-side memory (issue 17).

Generates alpaca records (100k and 1M by default) from ``benchmarks/data/alpaca_bench.json``
(each record made unique by a numbered instruction) as JSON lines, then reports, each
measurement in its own child process:

- **prepare**: ``tunelab data prepare`` on a cold cache, the whole command (interpreter start,
  imports, tokenizer load, reading, the parallel map, writing the cache), as tokens per
  second; against the SmolLM2 fast tokenizer's own batched throughput (one call per 1,000
  texts, Rust threads on) on the same text: the rendered conversations of the first
  ``--baseline-records`` records (the pipeline tokenizes exactly these texts, in pieces);
- **cache hit**: the same command again (whole command), and ``build_data`` alone in a child
  that has imported everything first (what a ``--resume`` pays for its data);
- **training-side memory**: peak RSS of a child that opens the cache (the memory-mapped views
  ``build_data`` returns), builds the trainer's batch order (``MicroBatches`` over the cache's
  ``lengths`` column, as the batch loop does) and collates every micro-batch of
  one epoch (batch size 8, padded); no model, so the numbers are the data's own. Reported with
  the child's RSS before opening.

Usage (repository root, venv active)::

    HF_HUB_OFFLINE=1 python benchmarks/data_scale.py                  # 100k + 1M, RSS at 10k/100k/1M
    HF_HUB_OFFLINE=1 python benchmarks/data_scale.py --sizes 20000 --rss-sizes 2000,20000   # a smoke run

Writes ``benchmarks/results/data-scale.{json,md}`` (``--tag`` changes the name) and records the
load average at the start and the end: the dev machines are shared, and every time moves with it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "benchmarks" / "data" / "alpaca_bench.json"


def generate(count: int, path: Path) -> None:
    """``count`` unique alpaca records drawn (seeded) from the benchmark set."""
    if path.is_file():
        return
    records = json.loads(SOURCE.read_text(encoding="utf-8"))
    rng = random.Random(count)
    with path.open("w", encoding="utf-8") as handle:
        for index in range(count):
            record = dict(rng.choice(records))
            record["instruction"] = f"Task {index}: {record['instruction']}"
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def run_config(work: Path, data: Path, count: int) -> Path:
    path = work / f"run-{count}.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": [str(data)], "max_length": 1024,
                                             "cache_dir": str(work / "cache")}}))
    return path


def child(*args: str) -> dict:
    """Run this script's child mode; its last stdout line is a JSON result."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_command(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run(["tunelab", *args], check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


# -------------------------------------------------------------------------- child modes


def _load(config: str):
    from tunelab.config import load_config
    from tunelab.data.templates import get_template
    from tunelab.models.loader import load_tokenizer

    cfg = load_config(config)
    tokenizer = load_tokenizer(cfg.model)
    return cfg, tokenizer, get_template(cfg.data.template, tokenizer, system=cfg.data.system)


def child_baseline(config: str, limit: int) -> dict:
    """The fast tokenizer alone, batched, on the rendered texts of the first ``limit`` records."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tunelab.data.records import Message

    cfg, tokenizer, template = _load(config)
    texts = []
    with open(cfg.data.train[0], encoding="utf-8") as handle:
        for line, _ in zip(handle, range(limit)):
            record = json.loads(line)
            user = record["instruction"] + (f"\n{record['input']}" if record["input"] else "")
            texts.append(template.render([Message("user", user), Message("assistant", record["output"])]))
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), 1000):
        tokens += sum(map(len, tokenizer(texts[i:i + 1000], add_special_tokens=False)["input_ids"]))
    seconds = time.perf_counter() - start
    return {"records": len(texts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def child_hit(config: str) -> dict:
    """``build_data`` on a warm cache, everything imported and the tokenizer loaded first. If the cache
    key changed since the cold run (the code of tunelab.data was edited meanwhile: the key includes it),
    nothing is built: the hit is reported as missed."""
    from tunelab.data.cache import cache_root
    from tunelab.data.fingerprint import cache_key
    from tunelab.data.pipeline import build_data
    from tunelab.data.sources import DatasetRegistry

    cfg, tokenizer, template = _load(config)
    specs = [DatasetRegistry(cfg.data.dataset_dir).resolve(name) for name in cfg.data.train]
    key, _ = cache_key(cfg, tokenizer, template, specs, [])
    if not (cache_root(cfg.data) / f"{cfg.stage}-{key}").is_dir():
        return {"hit": False}
    start = time.perf_counter()
    bundle = build_data(cfg, tokenizer)
    return {"hit": True, "seconds": time.perf_counter() - start, "examples": len(bundle.train)}


def child_rss(config: str, cache_dir: str) -> dict:
    """Peak RSS of opening a cache and collating one epoch of micro-batches in the trainer's order."""
    from tunelab.data.batching import PadWidth, collate_examples
    from tunelab.data.cache import open_prepared
    from tunelab.data.views import ExampleView
    from tunelab.memory import peak_rss_bytes, proc_kib_field_bytes
    from tunelab.train.batches import MicroBatches

    cfg, tokenizer, _ = _load(config)
    before = proc_kib_field_bytes("/proc/self/status", "VmRSS")
    start = time.perf_counter()
    prepared = open_prepared(Path(cache_dir))
    train = ExampleView(prepared.path / "train.arrow", prepared.kind)
    order = MicroBatches(train.lengths, 8, cfg.train.seed, True)
    ready = time.perf_counter() - start
    pad = PadWidth(cfg.data.pad_to_multiple_of, cfg.data.max_length)
    tokens = 0
    for _, index, indices in order.iterate(0, 0):
        batch = collate_examples([train[i] for i in indices], tokenizer.pad_token_id, False, pad)
        tokens += int(batch["padding_mask"].sum())
        if index == order.per_epoch - 1:
            break
    return {"examples": len(train), "rss_before": before, "peak_rss": peak_rss_bytes(),
            "ready_seconds": ready, "epoch_seconds": time.perf_counter() - start - ready, "tokens": tokens}


# -------------------------------------------------------------------------- the report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="record counts to prepare")
    parser.add_argument("--rss-sizes", default="10000,100000,1000000", help="record counts for the memory runs")
    parser.add_argument("--baseline-records", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunelab-data-scale"))
    parser.add_argument("--tag", default="data-scale")
    parser.add_argument("--rss-only", action="store_true",
                        help="redo only the memory runs, on the caches of an earlier run (same --work, --tag)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rss_sizes = [int(s) for s in args.rss_sizes.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    out = ROOT / "benchmarks" / "results"
    if args.rss_only:
        report = json.loads((out / f"{args.tag}.json").read_text())
        report["rss_load_average_start"] = os.getloadavg()
        for count in rss_sizes:
            cache, _ = _cache_of(args.work, count)
            report["rss"][str(count)] = child("rss", str(args.work / f"run-{count}.yaml"), str(cache))
            print(json.dumps({count: report["rss"][str(count)]}), flush=True)
        report["rss_load_average_end"] = os.getloadavg()
        _write(out, args.tag, report)
        return
    report: dict = {"load_average_start": os.getloadavg(), "cores": os.cpu_count(), "prepare": {}, "rss": {}}
    configs = {}
    for count in sorted(set(sizes) | set(rss_sizes)):
        data = args.work / f"alpaca-{count}.jsonl"
        generate(count, data)
        configs[count] = run_config(args.work, data, count)
    caches = {}
    for count in sorted(set(sizes) | set(rss_sizes)):
        config = str(configs[count])
        baseline = child("baseline", config, str(args.baseline_records)) if count in sizes else None
        cold = timed_command("data", "prepare", config)
        caches[count], tokens = _cache_of(args.work, count)
        if baseline is None:
            continue
        hit = child("hit", config)
        warm = timed_command("data", "prepare", config) if hit["hit"] else None
        report["prepare"][count] = {
            "tokens": tokens, "prepare_seconds": cold, "prepare_tokens_per_s": tokens / cold,
            "tokenizer_batched_tokens_per_s": baseline["tokens_per_s"],
            "ratio": tokens / cold / baseline["tokens_per_s"], "hit_command_seconds": warm,
            "hit_build_data_seconds": hit.get("seconds"), "baseline": baseline}
        print(json.dumps({count: report["prepare"][count]}), flush=True)
    for count in rss_sizes:
        report["rss"][count] = child("rss", str(configs[count]), str(caches[count]))
        print(json.dumps({count: report["rss"][count]}), flush=True)
    report["load_average_end"] = os.getloadavg()
    _write(out, args.tag, report)


def _write(out: Path, tag: str, report: dict) -> None:
    (out / f"{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{tag}.md").write_text(markdown(report))
    print(markdown(report))


def _cache_of(work: Path, count: int) -> tuple[Path, int]:
    """The cache built for ``alpaca-<count>.jsonl`` (found by its meta.json) and its token count."""
    for meta in sorted((work / "cache").glob("sft-*/meta.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        info = json.loads(meta.read_text())
        if any(str(work / f"alpaca-{count}.jsonl") in str(source) for spec in info["inputs"]["train"]
               for source in spec["sources"]):
            return meta.parent, int(info["stats"]["tokens"])
    raise SystemExit(f"no cache for {count} records under {work / 'cache'}")


def markdown(report: dict) -> str:
    mib = 2**20
    lines = [f"Load average {report['load_average_start'][0]:.1f} at the start, "
             f"{report['load_average_end'][0]:.1f} at the end ({report['cores']} cores).", "",
             "| records | tokens | prepare (whole command) | tokens/s | tokenizer alone, batched | ratio | "
             "hit: command | hit: build_data |", "|---|---|---|---|---|---|---|---|"]
    for count, r in report["prepare"].items():
        hit = (f"{r['hit_command_seconds']:.1f} s | {r['hit_build_data_seconds']:.2f} s"
               if r["hit_command_seconds"] is not None else "missed: tunelab.data changed | -")
        lines.append(f"| {int(count):,} | {r['tokens']:,} | {r['prepare_seconds']:.1f} s | "
                     f"{r['prepare_tokens_per_s']:,.0f} | {r['tokenizer_batched_tokens_per_s']:,.0f} | "
                     f"{r['ratio']:.2f} | {hit} |")
    if "rss_load_average_start" in report:
        lines += ["", f"Memory runs redone at load average {report['rss_load_average_start'][0]:.1f} "
                      f"(start) / {report['rss_load_average_end'][0]:.1f} (end)."]
    lines += ["", "| records | RSS before opening | peak RSS (open + one epoch of batches) | growth | "
              "open + batch order | epoch of batches |", "|---|---|---|---|---|---|"]
    for count, r in report["rss"].items():
        lines.append(f"| {int(count):,} | {r['rss_before'] / mib:.0f} MiB | {r['peak_rss'] / mib:.0f} MiB | "
                     f"{(r['peak_rss'] - r['rss_before']) / mib:.0f} MiB | {r['ready_seconds']:.1f} s | "
                     f"{r['epoch_seconds']:.1f} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    modes = {"baseline": lambda a: child_baseline(a[0], int(a[1])), "hit": lambda a: child_hit(a[0]),
             "rss": lambda a: child_rss(a[0], a[1])}
    if len(sys.argv) > 1 and sys.argv[1] in modes:
        print(json.dumps(modes[sys.argv[1]](sys.argv[2:])))
    else:
        main()
