"""Time a training run's evaluation (the eval split's loss and exact match, and the demo benchmarks) on 1 and on N
CPU ranks (gloo), split across the ranks as the trainer splits it (deepseek_vl2_lora/evaluation/ranks.py), and
check that every rank count gives the same predictions and metrics.

Each rank is a process with one torch thread (as `trainer.cpu_threads=1`), the default experiment's tiny model
and data unless overridden (`key=value`, as for train.py). The time is the evaluation alone (model loading and
data validation excluded), the median of --repeats, measured between barriers on rank 0.

    python scripts/bench_eval_ranks.py [--ranks 1 2] [--repeats 3] [trainer.eval_batch_size=8 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepseek_vl2_lora.training.dist_env import free_port  # noqa: E402

BENCHMARKS = ["data/demo/bench_vqa.tsv", "data/demo/bench_mcq.tsv"]


def worker(rank: int, world: int, port: int, overrides: list[str], repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    from deepseek_vl2_lora.eval import default_config
    from deepseek_vl2_lora.evaluation.benchmarks import parse_specs
    from deepseek_vl2_lora.evaluation.benchmarks.formats import load_benchmark
    from deepseek_vl2_lora.evaluation.benchmarks.runner import run_benchmark
    from deepseek_vl2_lora.evaluation.eval_set import evaluate
    from deepseek_vl2_lora.evaluation.ranks import EvalRanks
    from deepseek_vl2_lora.training.preflight import eval_datasets
    from deepseek_vl2_lora.training.run import load_model

    if world > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    cfg = default_config(overrides)
    device = torch.device("cpu")
    model, model_dir = load_model(cfg.model, "fp32", device)
    from deepseek_vl2_lora.data import DeepseekVL2Processor

    processor = DeepseekVL2Processor.from_pretrained(model_dir)
    loss_set, gen_set = eval_datasets(cfg.data, processor)
    benches = [load_benchmark(spec) for spec in parse_specs(BENCHMARKS)]
    ranks = EvalRanks(rank, world)
    tc = cfg.trainer
    seconds, cpu, result, bench_results = [], [], None, []
    for _ in range(repeats):
        if world > 1:
            torch.distributed.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        result = evaluate(model, processor, loss_set, gen_set, device, tc.eval_batch_size, tc.eval_max_new_tokens,
                          cfg.data.eval_limit, ranks=ranks)  # fmt: skip
        bench_results = [run_benchmark(model, processor, b, device, tc.eval_batch_size, tc.eval_max_new_tokens,
                                       ranks=ranks) for b in benches]  # fmt: skip
        cpu.append(time.process_time() - c0)  # this rank's own work (before waiting for the others)
        if world > 1:
            torch.distributed.barrier()
        seconds.append(time.perf_counter() - t0)
    ranks_cpu = ranks.gather([cpu])
    if rank == 0:
        record = {
            "ranks": world,
            "seconds": seconds,
            # per repeat, the busiest rank's CPU seconds: the wall time on cores of its own (a shared machine's
            # wall time also counts the other processes' share of the cores)
            "cpu_seconds": [max(c[i] for c in ranks_cpu) for i in range(repeats)],
            "metrics": {**result.metrics(), **{k: v for r in bench_results for k, v in r.log_metrics().items()}},
            "predictions": [result.predictions, *[r.predictions for r in bench_results]],
        }
        Path(out).write_text(json.dumps(record))
    if world > 1:
        torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.eval_batch_size=8")
    args = ap.parse_args(argv)
    overrides = ["trainer.eval_batch_size=8", *args.overrides]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.ranks:
            out = str(Path(tmp) / f"ranks{world}.json")
            torch.multiprocessing.spawn(worker, (world, free_port(), overrides, args.repeats, out), nprocs=world)
            runs[world] = json.loads(Path(out).read_text())
    base = runs[args.ranks[0]]
    print(f"evaluation: demo eval split + {', '.join(BENCHMARKS)}; overrides {' '.join(overrides)}; torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs, 1 thread per rank")  # fmt: skip
    print("| ranks | wall s (median) | × 1 rank | busiest rank's CPU s (median) | × 1 rank | same predictions | same "
          "metrics |\n| --- | --- | --- | --- | --- | --- | --- |")  # fmt: skip
    for world, run in runs.items():
        wall, cpu = (statistics.median(run[k]) for k in ("seconds", "cpu_seconds"))
        wall1, cpu1 = (statistics.median(base[k]) for k in ("seconds", "cpu_seconds"))
        same = run["predictions"] == base["predictions"]
        print(f"| {world} | {wall:.2f} | {wall / wall1:.2f} | {cpu:.2f} | {cpu / cpu1:.2f} | {same} | "
              f"{run['metrics'] == base['metrics']} |")  # fmt: skip
    keys = ("seconds", "cpu_seconds", "metrics")
    print(json.dumps({w: {k: r[k] for k in keys} for w, r in runs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
