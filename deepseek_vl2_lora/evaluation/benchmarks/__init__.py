"""Benchmarks in VLMEvalKit's file format (MMBench, SEED-Bench, AI2D, ScienceQA, MMMU, TextVQA, DocVQA, ChartQA,
OCRBench, ...): reading the TSV / parquet files (`formats`), DeepSeek-VL2's evaluation prompts (`prompts`), the
published scoring rules (`scoring`) and batched greedy evaluation of a model (`runner`).

The trainer and the eval CLI use this package; it never imports them.
"""

from .formats import Benchmark, BenchmarkError, BenchmarkSpec, load_benchmark, parse_specs
from .runner import BaselineCache, BenchmarkResult, BenchmarkSuite, run_benchmark

__all__ = [
    "BaselineCache",
    "Benchmark",
    "BenchmarkError",
    "BenchmarkResult",
    "BenchmarkSpec",
    "BenchmarkSuite",
    "load_benchmark",
    "parse_specs",
    "run_benchmark",
]
