"""Benchmarks (deepseek_vl2_lora/benchmarks): VLMEvalKit TSV/parquet reading, prompts, scoring against hand-computed
values, circular evaluation, errors. The model is replaced by scripted replies here; test_benchmark_workflow.py runs
the tiny model."""

import base64
import csv
import io
from pathlib import Path

import pytest
from PIL import Image

from deepseek_vl2_lora.evaluation import eval_set as evaluation
from deepseek_vl2_lora.evaluation.benchmarks import (
    BenchmarkError,
    BenchmarkSpec,
    load_benchmark,
    parse_specs,
    run_benchmark,
)
from deepseek_vl2_lora.evaluation.benchmarks.prompts import MCQ_INSTRUCTION, user_message
from deepseek_vl2_lora.evaluation.benchmarks.scoring import (
    anls,
    extract_choice,
    extract_yes_no,
    normalize_vqa,
    relaxed_accuracy,
    vqa_accuracy,
)

ROOT = Path(__file__).resolve().parents[1]


def png_b64(colour=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------ scoring
def test_vqa_accuracy_with_ten_references_is_the_subset_average():
    # 10 references, k of them equal to the answer. Leaving out a matching reference leaves k-1 matches, a
    # non-matching one k: mean over the 10 of min(matches / 3, 1).
    #   k=1: (1*0 + 9*1/3) / 10 = 0.3   k=2: (2*1/3 + 8*2/3) / 10 = 0.6   k=3: (3*2/3 + 7*1) / 10 = 0.9
    #   k=4: (4*1 + 6*1) / 10 = 1.0     k=0: 0
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        refs = ["cat"] * k + ["dog"] * (10 - k)
        assert vqa_accuracy("cat", refs) == pytest.approx(expected), k


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The dog.", "dog"),  # article dropped, final period stripped, lower case
        ("a red car!", "red car"),
        ("an apple", "apple"),
        ("Two", "2"),  # number words to digits
        ("ten dogs", "10 dogs"),
        ("none", "0"),
        ("dont", "don't"),  # contractions restored
        ("isnt it", "isn't it"),
        ("1,000", "1000"),  # a thousands separator: punctuation removed, not split
        ("3.5", "3.5"),  # a decimal point stays
        ("black-and-white", "black and white"),  # a mark inside a word splits it
        ("yes ,", "yes"),  # a mark next to a space goes
        ("  Yes\n", "yes"),
    ],
)
def test_vqa_normalisation(text, normalized):
    assert normalize_vqa(text) == normalized


def test_vqa_accuracy_counts_normalised_matches():
    refs = ["2", "2", "two", "2 ", "Two.", "3", "3", "3", "3", "3"]  # five say 2 in some form
    assert vqa_accuracy("two", refs) == pytest.approx(1.0)  # 5 matches: every subset keeps >= 4
    assert vqa_accuracy("The 3.", refs) == pytest.approx(1.0)
    assert vqa_accuracy("4", refs) == 0.0
    assert vqa_accuracy("Yes", ["yes"]) == 1.0  # a single reference: plain match after normalisation


def test_anls_threshold_and_best_reference():
    assert anls("hallo", ["hello"]) == pytest.approx(0.8)  # 1 edit over 5 characters
    assert anls("abxy", ["abcd"]) == pytest.approx(0.5)  # similarity exactly 0.5: kept
    assert anls("axyz", ["abcd"]) == 0.0  # 3/4 distance: similarity 0.25 < 0.5 -> 0
    assert anls("Hello  World", ["hello world"]) == 1.0  # case and repeated spaces ignored
    assert anls("hallo", ["xxxxxxx", "hello"]) == pytest.approx(0.8)  # the best reference counts
    assert anls("abcdefgh", ["abcdefg"]) == pytest.approx(7 / 8)  # 1 edit over the longer length 8


def test_relaxed_accuracy_five_percent():
    assert relaxed_accuracy("10.4", ["10"]) == 1.0  # 4 % off
    assert relaxed_accuracy("10.5", ["10"]) == 1.0  # exactly 5 %: correct
    assert relaxed_accuracy("10.6", ["10"]) == 0.0  # 6 %
    assert relaxed_accuracy("9.5", ["10"]) == 1.0
    assert relaxed_accuracy("5%", ["0.05"]) == 1.0  # a percentage is a fraction
    assert relaxed_accuracy("Paris", ["paris"]) == 1.0  # text: exact, case-insensitive
    assert relaxed_accuracy("Paris.", ["paris"]) == 0.0
    assert relaxed_accuracy("0", ["0"]) == 1.0  # a zero reference: exact match
    assert relaxed_accuracy("0.01", ["0"]) == 0.0
    assert relaxed_accuracy("20", ["7", "19.5"]) == 1.0  # any reference


def test_extract_choice_letter_forms_then_option_text():
    options = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    assert extract_choice("B", options) == "B"
    assert extract_choice("(C) green", options) == "C"
    assert extract_choice("A. red", options) == "A"
    assert extract_choice("Answer: D", options) == "D"
    assert extract_choice("The answer is C.", options) == "C"
    assert extract_choice("blue", options) == "B"  # no letter: the option's text
    assert extract_choice("It is Green.", options) == "C"
    assert extract_choice("A or B", options) is None  # two letters, no option text
    assert extract_choice("red or blue", options) is None  # two option texts
    assert extract_choice("I cannot tell", options) is None
    assert extract_choice("", options) is None


def test_extract_yes_no():
    assert extract_yes_no("Yes, it is.") == "yes"
    assert extract_yes_no("no") == "no"
    assert extract_yes_no("yes and no") is None
    assert extract_yes_no("maybe") is None


# ------------------------------------------------------------------------------------------------ files + runner
MCQ_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "E", "F", "G", "H", "answer", "category", "image"]


def mcq_file(tmp_path: Path, name="quiz.tsv") -> Path:
    img = png_b64()
    rows = [
        # index, question, hint, A..H, answer, category, image
        [0, "Q0 two options?", "Look closely.", "yes", "no", "", "", "", "", "", "", "B", "x", img],
        [1, "Q1 eight options?", "", *"one two three four five six seven eight".split(), "H", "x", img],
        [2, "Q2 four options?", "", "cat", "dog", "cow", "hen", "", "", "", "", "A", "x", img],
        [3, "Q3 three options?", "", "up", "down", "left", "", "", "", "", "", "C", "y", "0"],  # row 0's image
        [4, "Q4 four options?", "", "red", "blue", "green", "pink", "", "", "", "", "B", "y", img],
    ]
    return write_tsv(tmp_path / name, MCQ_HEADER, rows)


@pytest.fixture
def scripted(monkeypatch):
    """Replace generation with replies chosen by a function of the prompt text (no model)."""

    def install(reply_for):
        def fake(model, processor, encode, n, batch_size, max_new_tokens, device, autocast, ranks=None):
            return [(k, reply_for(encode(k)["prompt"])) for k in range(n)]

        class Processor:
            def encode(self, messages, images, generation):
                assert generation and len(images) == messages[0]["content"].count("<image>")
                assert all(im.mode == "RGB" for im in images)
                return {"prompt": messages[0]["content"]}

        class Model:
            training = False

            def eval(self):
                pass

            def train(self, mode):
                pass

        monkeypatch.setattr(evaluation, "generate_replies", fake)
        return Model(), Processor()

    return install


def _run(bench, model, processor):
    return run_benchmark(model, processor, bench, "cpu", batch_size=2, max_new_tokens=4)


def test_mcq_prompts_accuracy_per_category_and_unparsed(tmp_path, scripted):
    bench = load_benchmark(BenchmarkSpec(str(mcq_file(tmp_path))))
    assert (bench.name, bench.task, bench.circular) == ("quiz", "mcq", False)
    assert [len(q.options) for q in bench.questions] == [2, 8, 4, 3, 4]
    replies = {"Q0": "B", "Q1": "(H) eight", "Q2": "The answer is C.", "Q3": "I cannot tell", "Q4": "blue"}
    prompts = []

    def reply(prompt):
        prompts.append(prompt)
        return next(v for k, v in replies.items() if k in prompt)

    result = _run(bench, *scripted(reply))
    assert prompts[0] == (
        "<image>\nHint: Look closely.\nQuestion: Q0 two options?\nOptions:\nA. yes\nB. no\n" + MCQ_INSTRUCTION
    )
    assert prompts[3] == "<image>\nQuestion: Q3 three options?\nOptions:\nA. up\nB. down\nC. left\n" + MCQ_INSTRUCTION
    # Q0, Q1 (letter), Q4 (option text) right; Q2 wrong (C, answer A); Q3 unparseable (wrong).
    m = result.metrics
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["accuracy/x"] == pytest.approx(2 / 3) and m["accuracy/y"] == pytest.approx(1 / 2)
    assert (m["questions"], m["asked"], m["unparsed"]) == (5, 5, 1)
    assert result.log_metrics()["eval/quiz/accuracy"] == pytest.approx(0.6)
    assert [p["parsed"] for p in result.predictions] == ["B", "H", "C", None, "B"]


def test_circular_evaluation_rotates_options_and_needs_every_rotation(tmp_path, scripted):
    path = mcq_file(tmp_path, "MMBench_DEV_EN.tsv")  # MMBench-named: circular by default
    bench = load_benchmark(BenchmarkSpec(str(path), limit=3))
    assert bench.circular and bench.rotate and len(bench.questions) == 3

    def reply(prompt):
        if "Q0" in prompt:  # always the text "no": right in both rotations
            return "no"
        if "Q1" in prompt:  # always letter H: right only where "eight" sits at H
            return "H"
        return "cat"  # Q2: always the right text

    result = _run(bench, *scripted(reply))
    m = result.metrics
    assert (m["questions"], m["asked"]) == (3, 2 + 8 + 4)
    assert m["accuracy"] == pytest.approx(2 / 3)
    shifts = [(p["index"], p["shift"], p["reference"]) for p in result.predictions if p["index"] == "0"]
    assert shifts == [("0", 0, "B"), ("0", 1, "A")]  # the answer moves with the rotation
    q1 = [p for p in result.predictions if p["index"] == "1"]
    assert sum(p["score"] for p in q1) == 1.0 and "A. eight" in q1[7]["prompt"]


def test_circular_copies_in_the_file_are_grouped_by_index(tmp_path, scripted):
    img = png_b64()
    header = ["index", "question", "A", "B", "C", "answer", "category", "image"]
    rows = [
        [5, "Qa", "up", "down", "left", "A", "c", img],
        [1000005, "Qa", "down", "left", "up", "C", "c", img],
        [2000005, "Qa", "left", "up", "down", "B", "c", img],
        [6, "Qb", "up", "down", "left", "B", "c", img],
        [1000006, "Qb", "down", "left", "up", "A", "c", img],
        [2000006, "Qb", "left", "up", "down", "C", "c", img],
    ]
    path = write_tsv(tmp_path / "circ.tsv", header, rows)
    bench = load_benchmark(BenchmarkSpec(str(path)))
    assert bench.circular and not bench.rotate and [q.group for q in bench.questions] == ["5"] * 3 + ["6"] * 3
    # Qa always "up" (right 3 times); Qb always "A" (right once).
    result = _run(bench, *scripted(lambda p: "up" if "Qa" in p else "A"))
    assert result.metrics["accuracy"] == 0.5 and result.metrics["asked"] == 6
    flat = load_benchmark(BenchmarkSpec(str(path), circular=False))  # copies dropped
    assert [q.index for q in flat.questions] == ["5", "6"]


def test_vqa_file_with_references_and_task_detection(tmp_path, scripted):
    img = png_b64()
    header = ["index", "question", "answer", "image"]
    refs = repr(["2"] * 2 + ["two"] + ["3"] * 7)
    rows = [[0, "How many?", refs, img], [1, "Colour?", repr(["red"] * 10), img]]
    bench = load_benchmark(BenchmarkSpec(str(write_tsv(tmp_path / "TextVQA_VAL.tsv", header, rows))))
    assert bench.task == "vqa" and bench.questions[0].references[2] == "two"
    result = _run(bench, *scripted(lambda p: "Two" if "How many" in p else "a red"))
    assert result.metrics["accuracy"] == pytest.approx((0.9 + 1.0) / 2)  # 3 matches of 10 -> 0.9
    assert result.predictions[0]["prompt"] == "How many?"  # the text after the image

    rows = [[0, "Title?", repr(["hello", "Hello!"]), img], [1, "Year?", "1999", img]]
    bench = load_benchmark(BenchmarkSpec(str(write_tsv(tmp_path / "DocVQA_VAL.tsv", header, rows))))
    assert bench.task == "anls"
    result = _run(bench, *scripted(lambda p: "hallo" if "Title" in p else "2999"))
    assert result.metrics["accuracy"] == pytest.approx((0.8 + 0.75) / 2)

    rows = [[0, "Value?", "10", img], [1, "Label?", "Q3", img]]
    bench = load_benchmark(BenchmarkSpec(str(write_tsv(tmp_path / "ChartQA_TEST.tsv", header, rows))))
    assert bench.task == "relaxed"
    result = _run(bench, *scripted(lambda p: "10.4" if "Value" in p else "q3"))
    assert result.metrics["accuracy"] == 1.0

    rows = [[0, "Is it red?", "Yes", img], [1, "Is it blue?", "No", img], [2, "Big?", "No", img]]
    bench = load_benchmark(BenchmarkSpec(str(write_tsv(tmp_path / "MME.tsv", header, rows))))
    assert bench.task == "yesno"
    result = _run(bench, *scripted(lambda p: {"Is it red?": "Yes.", "Is it blue?": "yes", "Big?": "hmm"}[p[8:]]))
    assert result.metrics["accuracy"] == pytest.approx(1 / 3) and result.metrics["unparsed"] == 1


def test_limit_and_image_path_and_parquet_copy(tmp_path):
    pytest.importorskip("datasets")
    import datasets

    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "pic.png")
    header = ["index", "question", "A", "B", "answer", "image_path"]
    path = write_tsv(tmp_path / "paths.tsv", header, [[i, f"Q{i}", "x", "y", "A", "pic.png"] for i in range(5)])
    bench = load_benchmark(BenchmarkSpec(str(path), limit=2))
    assert [q.question for q in bench.questions] == ["Q0", "Q1"]
    assert bench.questions[0].load_images()[0].getpixel((0, 0)) == (0, 0, 255)

    data = {
        "index": [0, 1],
        "question": ["Q0", "Q1"],
        "A": ["x", "x"],
        "B": ["y", "y"],
        "answer": ["B", "A"],
        "category": ["c", "d"],
        "image": [{"bytes": base64.b64decode(png_b64((1, 2, 3))), "path": None}] * 2,
    }
    features = datasets.Features(
        {k: datasets.Value("int64" if k == "index" else "string") for k in data if k != "image"}
        | {"image": datasets.Image()}
    )
    (tmp_path / "MMStar").mkdir()
    pq = tmp_path / "MMStar" / "val-00000-of-00001.parquet"
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(pq))
    bench = load_benchmark(BenchmarkSpec(str(pq)))
    assert bench.name == "MMStar_val" and bench.task == "mcq"
    assert [(q.index, q.answer, q.category) for q in bench.questions] == [("0", "B", "c"), ("1", "A", "d")]
    assert bench.questions[1].load_images()[0].getpixel((0, 0)) == (1, 2, 3)


# ------------------------------------------------------------------------------------------------ errors
def _error(tmp_path, header, rows, name="bad.tsv", **spec) -> str:
    path = write_tsv(tmp_path / name, header, rows)
    with pytest.raises(BenchmarkError) as e:
        load_benchmark(BenchmarkSpec(str(path), **spec))
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_bad_files_are_one_line_errors_naming_file_row_and_column(tmp_path):
    img = png_b64()
    msg = _error(tmp_path, ["index", "question", "A", "B", "answer", "image"], [[0, "Q", "x", "y", "A", "!!notb64"]])
    assert "row 1" in msg and "column image" in msg and "base64" in msg
    not_png = base64.b64encode(b"not an image").decode()
    msg = _error(tmp_path, ["index", "question", "A", "B", "answer", "image"], [[0, "Q", "x", "y", "A", not_png]])
    assert "row 1" in msg and "not a readable image" in msg
    msg = _error(tmp_path, ["index", "prompt", "answer", "image"], [[0, "Q", "a", img]])
    assert "no 'question' column" in msg
    msg = _error(tmp_path, ["index", "question", "image"], [[0, "Q", img]])
    assert "no 'answer' column" in msg and "split with answers" in msg
    rows = [[0, "Q", "x", "y", "A", img], [1, "Q", "x", "y", "C", img]]
    msg = _error(tmp_path, ["index", "question", "A", "B", "answer", "image"], rows)
    assert "row 2" in msg and "column answer" in msg and "'C' is not one of" in msg
    msg = _error(tmp_path, ["index", "question", "answer", "image_path"], [[0, "Q", "a", "missing.png"]])
    assert "column image_path" in msg and "missing.png not found" in msg
    msg = _error(tmp_path, ["index", "question", "answer", "image"], [[0, "Q", "a", img]], circular=True)
    assert "circular evaluation needs a multiple-choice" in msg
    with pytest.raises(BenchmarkError, match="benchmark file not found"):
        load_benchmark(BenchmarkSpec(str(tmp_path / "nope.tsv")))


def test_specs_from_config_entries():
    specs = parse_specs(["a/MMBench.tsv", {"path": "b.tsv", "limit": 5, "name": "b2"}], limit=100)
    assert [(s.path, s.name, s.limit) for s in specs] == [("a/MMBench.tsv", None, 100), ("b.tsv", "b2", 5)]
    with pytest.raises(BenchmarkError, match="unknown key"):
        parse_specs([{"path": "a.tsv", "limmit": 3}])
    with pytest.raises(BenchmarkError, match="task='mc'"):
        parse_specs([{"path": "a.tsv", "task": "mc"}])
    with pytest.raises(BenchmarkError, match="given twice"):
        parse_specs(["x/a.tsv", "y/a.tsv"])


def test_demo_benchmarks_are_reproducible_and_load():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "scripts/make_demo_benchmark.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    mcq = load_benchmark(BenchmarkSpec("data/demo/bench_mcq.tsv"))
    vqa = load_benchmark(BenchmarkSpec("data/demo/bench_vqa.tsv"))
    assert (mcq.task, len(mcq.questions), vqa.task, len(vqa.questions)) == ("mcq", 64, "vqa", 64)
    assert {len(q.options) for q in mcq.questions} == {2, 3, 4}
    assert all(len(q.references) == 10 for q in vqa.questions)
    assert user_message("Q", 1) == [{"role": "user", "content": "<image>\nQ"}]


def test_open_rows_in_a_multiple_choice_file_and_question_id_indices(tmp_path, scripted):
    img = png_b64()
    header = ["index", "question", "A", "B", "answer", "image"]
    rows = [["v_1", "Pick one", "cat", "dog", "B", img], ["v_2", "How many legs?", "", "", "4", f"['{img}', '{img}']"]]
    bench = load_benchmark(BenchmarkSpec(str(write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", header, rows))))
    assert bench.task == "mcq" and len(bench.questions[1].images) == 2  # a list literal: two images
    result = _run(bench, *scripted(lambda p: "B" if "Pick" in p else "Four."))
    assert result.metrics["accuracy"] == 1.0  # the open row: VQA normalisation, "Four." -> "4"
    assert result.predictions[1]["prompt"] == "How many legs?"

    # VQAv2-style question ids are no circular copies (only multiple-choice files have those).
    rows = [[262148000, "Q", "", "", "yes", img], [262148001, "Q", "", "", "no", img]]
    bench = load_benchmark(BenchmarkSpec(str(write_tsv(tmp_path / "VQAv2_VAL.tsv", header, rows))))
    assert (bench.task, bench.circular) == ("yesno", False)
