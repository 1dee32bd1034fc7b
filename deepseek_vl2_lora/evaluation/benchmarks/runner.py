"""Evaluate a model on benchmarks: batched greedy generation (left padding), scoring, accuracy per category, and
a cache of the untrained baseline's results per model.

Metrics of benchmark NAME (the keys the trainer logs to metrics.jsonl and W&B, and eval.json holds):

    eval/NAME/accuracy             the benchmark's score in [0, 1] (accuracy, VQA accuracy, ANLS or relaxed accuracy)
    eval/NAME/accuracy/CATEGORY    the same per `category` (else `l2-category`) value
    eval/NAME/questions            questions scored (circular: original questions)
    eval/NAME/asked                prompts generated (circular: one per rotation)
    eval/NAME/unparsed             replies no option letter (yes/no) could be read from: scored wrong

With circular evaluation a question counts as correct only if every rotation of its options is answered correctly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..ranks import ONE_PROCESS, EvalRanks
from .formats import Benchmark, Question, load_benchmark
from .prompts import mcq_prompt, rotate_options, user_message, vqa_prompt
from .scoring import extract_choice, score_open

log = logging.getLogger(__name__)
# Bump when prompts, scoring or generation change what a cached baseline would hold.
CACHE_VERSION = 1


@dataclass
class Ask:
    """One prompt to generate from: a question, or one rotation of a multiple-choice question."""

    question: Question
    prompt: str
    options: dict[str, str]
    answer: str | None  # the correct letter in these (rotated) options
    shift: int = 0


@dataclass
class BenchmarkResult:
    name: str
    task: str
    path: str
    circular: bool
    metrics: dict[str, float]  # keys without the eval/NAME/ prefix
    predictions: list[dict] = field(default_factory=list)
    cached: bool = False  # read from the baseline cache, not generated now

    def log_metrics(self) -> dict[str, float]:
        return {f"eval/{self.name}/{k}": v for k, v in self.metrics.items()}

    def describe(self) -> str:
        m = self.metrics
        extra = f", {m['unparsed']} unparsed" if m.get("unparsed") else ""
        circular = f", circular over {m['asked']} prompts" if self.circular else ""
        cached = " [cached baseline]" if self.cached else ""
        return f"{self.name} ({self.task}): {m['accuracy']:.3f} on {m['questions']} questions{circular}{extra}{cached}"


def build_asks(bench: Benchmark) -> list[Ask]:
    asks = []
    for q in bench.questions:
        if bench.task != "mcq" or not q.options:
            asks.append(Ask(q, vqa_prompt(q.question), {}, None))
            continue
        for shift in range(len(q.options) if bench.rotate else 1):
            options, answer = rotate_options(q.options, q.answer, shift)
            asks.append(Ask(q, mcq_prompt(q.question, options, q.hint), options, answer, shift))
    return asks


def _category_key(category: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", category.strip()).strip("_") or "none"


def aggregate(predictions: list[dict]) -> dict[str, float]:
    """Accuracy over questions (a circular group scores its worst rotation) overall and per category."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for p in predictions:
        groups[p["group"]].append(p)
    scores = {g: min(p["score"] for p in ps) for g, ps in groups.items()}
    by_category: dict[str, list[float]] = defaultdict(list)
    for g, ps in groups.items():
        category = ps[0].get("category")
        if category is not None:
            by_category[_category_key(category)].append(scores[g])
    metrics = {
        "accuracy": sum(scores.values()) / len(scores) if scores else 0.0,
        "questions": len(scores),
        "asked": len(predictions),
        "unparsed": sum(p["parsed"] is None for p in predictions),
    }
    for category, values in sorted(by_category.items()):
        metrics[f"accuracy/{category}"] = sum(values) / len(values)
    return metrics


def run_benchmark(
    model,
    processor,
    bench: Benchmark,
    device,
    batch_size: int,
    max_new_tokens: int,
    autocast=nullcontext,
    ranks: EvalRanks = ONE_PROCESS,
) -> BenchmarkResult:
    """Generate greedily for every question (every rotation) of `bench` and score the replies. `ranks`: the
    generation split across ranks (`evaluation.ranks`), every rank scoring all the replies."""
    from ..eval_set import generate_replies  # torch-heavy: only when evaluating

    asks = build_asks(bench)

    def encode(k: int) -> dict:
        images = asks[k].question.load_images()
        return processor.encode(user_message(asks[k].prompt, len(images)), images, generation=True)

    predictions = []
    with ranks.evaluating(model):
        max_new = bench.max_new_tokens or max_new_tokens
        replies = generate_replies(model, processor, encode, len(asks), batch_size, max_new, device, autocast, ranks)
        for k, reply in replies:
            a = asks[k]
            q = a.question
            if a.options:
                parsed = extract_choice(reply, a.options)
                score = float(parsed == a.answer)
                reference = a.answer
            else:  # an open question (in a multiple-choice file too: MMMU's): its task's rule, VQA there
                score, parsed = score_open(bench.task if bench.task != "mcq" else "vqa", reply, q.references)
                reference = q.references
            predictions.append(
                {
                    "index": q.index,
                    "row": q.row,
                    "group": q.group,
                    "shift": a.shift,
                    "category": q.category if q.category is not None else q.l2_category,
                    "prompt": a.prompt,
                    "prediction": reply,
                    "parsed": parsed,
                    "reference": reference,
                    "score": score,
                }
            )
    return BenchmarkResult(bench.name, bench.task, str(bench.path), bench.circular, aggregate(predictions), predictions)


# ------------------------------------------------------------------------------------------------ baseline cache
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model_dir: str | Path) -> list:
    """The checkpoint's identity without hashing its weights: its path and every file's name, size and mtime."""
    model_dir = Path(model_dir).resolve()
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    return [str(model_dir), *[(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]


class BaselineCache:
    """Results of the untrained model, one JSON per (model, benchmark file, questions, generation settings), under
    <cache root>/benchmark_baselines: every run of every policy on the same model starts from the same numbers."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            from ...model.tiny import cache_root

            root = cache_root()
        self.dir = Path(root) / "benchmark_baselines"

    def key(self, model_dir: str | Path, bench: Benchmark, settings: dict) -> str:
        material = {
            "version": CACHE_VERSION,
            "model": model_fingerprint(model_dir),
            "file": _file_digest(bench.path),
            "task": bench.task,
            "circular": bench.circular,
            "questions": [q.index for q in bench.questions],
            **settings,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get(self, key: str) -> BenchmarkResult | None:
        path = self.dir / f"{key}.json"
        if not path.is_file():
            return None
        try:
            return BenchmarkResult(**{**json.loads(path.read_text()), "cached": True})
        except (ValueError, TypeError):  # a torn or foreign file: recompute
            return None

    def put(self, key: str, result: BenchmarkResult) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{key}.json.tmp"
        tmp.write_text(json.dumps({**asdict(result), "cached": False}))
        tmp.replace(self.dir / f"{key}.json")


def write_predictions(result: BenchmarkResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in result.predictions))
    return path


class BenchmarkSuite:
    """The benchmarks a training run evaluates at each of its evals (loaded and checked once, up front).

    `specs`: BenchmarkSpecs (or Benchmarks already loaded). `suite(model, step, tag)` runs them all and returns their
    metrics; with tag "before" the untrained baseline is read from the cache when there (`baseline_key`: (model dir,
    settings); None: no cache, e.g. with several ranks, which must all take the same path). Predictions go to
    <out_dir>/<name>/step_XXXXXXXX.jsonl (None: not written). `ranks`: each benchmark split across ranks.
    """

    def __init__(
        self,
        specs,
        processor,
        device,
        batch_size: int,
        max_new_tokens: int,
        autocast=nullcontext,
        baseline_key: tuple | None = None,
        out_dir: str | Path | None = None,
        cache: BaselineCache | None = None,
        ranks: EvalRanks = ONE_PROCESS,
    ):
        self.ranks = ranks
        self.benchmarks = [s if isinstance(s, Benchmark) else load_benchmark(s) for s in specs]
        self.processor = processor
        self.device = device
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.autocast = autocast
        self.baseline_key = baseline_key
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.cache = cache or (BaselineCache() if baseline_key is not None else None)

    def __bool__(self) -> bool:
        return bool(self.benchmarks)

    def run(self, model, bench: Benchmark, baseline: bool) -> BenchmarkResult:
        key = None
        if baseline and self.cache is not None:
            model_dir, settings = self.baseline_key
            max_new = bench.max_new_tokens or self.max_new_tokens
            key = self.cache.key(model_dir, bench, {**settings, "batch_size": self.batch_size, "max_new": max_new})
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        result = run_benchmark(
            model, self.processor, bench, self.device, self.batch_size, self.max_new_tokens, self.autocast, self.ranks
        )
        if key is not None:
            self.cache.put(key, result)
        return result

    def __call__(self, model, step: int, tag: str) -> dict[str, float]:
        metrics = {}
        for bench in self.benchmarks:
            result = self.run(model, bench, baseline=tag == "before")
            metrics.update(result.log_metrics())
            if self.out_dir is not None:
                write_predictions(result, self.out_dir / bench.name / f"step_{step:08d}.jsonl")
            log.info("benchmark (%s, step %d): %s", tag, step, result.describe())
        return metrics
