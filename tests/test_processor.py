"""DeepseekVL2Processor against hand-derived references: token counts, tiling, layout, labels, batching."""

import json

import pytest
import torch
from helpers import write_processor_files
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deepseek_vl2_lora.data.collate import Collator
from deepseek_vl2_lora.data.processor import DeepseekVL2Processor, SampleError
from deepseek_vl2_lora.data.tiling import image_to_tensor, select_best_resolution
from deepseek_vl2_lora.model.processor_config import ProcessorConfigError, candidate_resolutions, write_processor_config
from deepseek_vl2_lora.model.tokenizer import CORPUS_PATH

BOS, EOS, PAD, IMG, USER, ASSISTANT = 0, 1, 2, 3, 9, 10  # the documented id layout

# The released candidate_resolutions for 384 (copied from the reference notes, in their order).
OFFICIAL_384 = [
    [384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384], [768, 768],
    [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768], [384, 2688], [2688, 384],
    [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456], [3456, 384], [1152, 1152],
]  # fmt: skip


# `proc` (conftest): tile 32, patch 4, downsample 2: h = w = 4, so one image takes 4*5 + 1 + (4*th)*(4*tw + 1).
@pytest.fixture(scope="session")
def ckpt_384(tmp_path_factory):
    return write_processor_files(tmp_path_factory.mktemp("ckpt384"), image_size=384, patch_size=14)


@pytest.fixture(scope="session")
def proc384(ckpt_384):
    return DeepseekVL2Processor.from_pretrained(ckpt_384)


@pytest.fixture(scope="session")
def raw_tok(ckpt_384):
    """The plain `tokenizers` file: an independent reference for how text pieces tokenize."""
    return Tokenizer.from_file(str(ckpt_384 / "tokenizer.json"))


def tk(raw_tok, text):
    return raw_tok.encode(text, add_special_tokens=False).ids


def solid(w, h, colour=(255, 0, 0)):
    return Image.new("RGB", (w, h), colour)


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


# ------------------------------------------------------------------------------------------------- config


def test_candidate_resolutions_official_order():
    assert candidate_resolutions(384) == OFFICIAL_384
    assert candidate_resolutions(64) == [[w // 6, h // 6] for w, h in OFFICIAL_384]
    assert candidate_resolutions(10, candidate_grid=2) == [[10, 10], [10, 20], [20, 10]]


def test_processor_config_file(ckpt_384):
    cfg = json.loads((ckpt_384 / "processor_config.json").read_text(encoding="utf-8"))
    assert cfg["candidate_resolutions"] == OFFICIAL_384
    assert (cfg["patch_size"], cfg["downsample_ratio"]) == (14, 2)
    assert cfg["image_mean"] == cfg["image_std"] == [0.5, 0.5, 0.5]
    assert cfg["image_token"] == "<image>" and cfg["pad_token"] == "<｜▁pad▁｜>"
    assert cfg["sft_format"] == "deepseek" and cfg["ignore_id"] == -100 and cfg["mask_prompt"] is True
    assert cfg["normalize"] is True and cfg["add_special_token"] is False


def test_write_processor_config_overrides(tmp_path):
    path = write_processor_config(tmp_path, 32, 4, mask_prompt=False, downsample_ratio=1)
    cfg = json.loads(path.read_text(encoding="utf-8"))
    assert cfg["mask_prompt"] is False and cfg["downsample_ratio"] == 1


def test_loaded_attributes(proc384):
    assert proc384.image_size == 384
    assert (proc384.bos_id, proc384.eos_id, proc384.pad_id, proc384.image_token_id) == (BOS, EOS, PAD, IMG)
    assert proc384.tokenizer.padding_side == "left"  # as the official processor forces


def test_missing_or_invalid_config(tmp_path, ckpt_384):
    with pytest.raises(ProcessorConfigError, match="processor_config.json"):
        DeepseekVL2Processor.from_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ProcessorConfigError, match="processor_config.json.*not valid JSON"):
        DeepseekVL2Processor.from_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"patch_size": 14}), encoding="utf-8")
    with pytest.raises(ProcessorConfigError, match="processor_config.json.*candidate_resolutions"):
        DeepseekVL2Processor.from_pretrained(tmp_path)
    write_processor_config(tmp_path, 32, 4, candidate_resolutions=[[32, 32], [48, 32]])
    with pytest.raises(ProcessorConfigError, match="multiple of the tile size"):
        DeepseekVL2Processor.from_pretrained(tmp_path)
    write_processor_config(tmp_path, 32, patch_size=0)
    with pytest.raises(ProcessorConfigError, match="patch_size"):
        DeepseekVL2Processor.from_pretrained(tmp_path)
    write_processor_config(tmp_path, 32, 4)
    with pytest.raises(ProcessorConfigError, match="no tokenizer"):
        DeepseekVL2Processor.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("garbage", encoding="utf-8")
    with pytest.raises(ProcessorConfigError, match="could not load the tokenizer"):
        DeepseekVL2Processor.from_pretrained(tmp_path)


def test_adds_missing_special_tokens(tmp_path):
    # A tokenizer that has only bos/eos: the processor must add pad, <image>, grounding and chat tokens.
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator([CORPUS_PATH.read_text(encoding="utf-8")], trainer=trainer)
    raw.save(str(tmp_path / "tokenizer.json"))
    cfg = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<｜begin▁of▁sentence｜>"}
    cfg["eos_token"] = "<｜end▁of▁sentence｜>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    write_processor_config(tmp_path, 32, 4)
    p = DeepseekVL2Processor.from_pretrained(tmp_path)
    added = ["<｜▁pad▁｜>", "<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"]
    added += ["<|User|>", "<|Assistant|>"]
    ids = [p.tokenizer.convert_tokens_to_ids(t) for t in added]
    assert ids == list(range(300, 309))  # appended in the official order
    assert p.pad_id == 300 and p.image_token_id == 301 and p.vocab_size == 309
    for token, token_id in zip(added, ids):
        assert p.tokenize(f"a{token}b")[1] == token_id


# ----------------------------------------------------------------------------------------- token counts


@pytest.mark.parametrize(
    "tw, th, expected",
    # 14*15 + 1 + (14*th)*(14*tw + 1), evaluated by hand
    [(1, 1, 421), (2, 2, 1023), (3, 3, 2017), (1, 9, 2101), (9, 1, 1989), (2, 1, 617), (1, 2, 631)],
)
def test_num_image_tokens_384(proc384, tw, th, expected):
    assert proc384.num_image_tokens(tw, th) == expected


def test_num_image_tokens_small(proc):
    # 4*5 + 1 + (4*th)*(4*tw + 1)
    assert proc.num_image_tokens(1, 1) == 41
    assert proc.num_image_tokens(2, 1) == 57
    assert proc.num_image_tokens(1, 2) == 61


@pytest.mark.parametrize(
    "size, best",
    [
        ((384, 384), (384, 384)),  # exact fit, zero waste
        ((100, 50), (384, 384)),  # every candidate keeps all 5000 px; the smallest area wastes least
        ((768, 384), (768, 384)),  # exact fit
        ((384, 3456), (384, 3456)),  # 1x9 portrait
        ((500, 400), (768, 768)),  # full 200000 px needs w>=500, h>=400; 768x768 is the smallest such
        ((800, 500), (1152, 768)),  # full 400000 px needs w>=800, h>=500: 1152x768 (884736) is smallest
        ((1000, 1000), (1152, 1152)),  # only 1152x1152 keeps every pixel
        ((4000, 100), (3456, 384)),  # 3456/4000 = 0.864 -> 3456x86 = 297216 px, the most of any candidate
    ],
)
def test_select_best_resolution(size, best):
    assert select_best_resolution(size, OFFICIAL_384) == best


def test_select_best_resolution_tie_keeps_first():
    # (5, 5) fits both candidates fully with equal waste: the first in config order wins (strictly-better rule).
    assert select_best_resolution((5, 5), [[20, 10], [10, 20]]) == (20, 10)
    assert select_best_resolution((5, 5), [[10, 20], [20, 10]]) == (10, 20)


def test_plan_token_counts_per_aspect_ratio(proc384):
    msgs = [user("<image>\nq"), assistant("a")]
    for size, n_img in [((384, 384), 421), ((768, 768), 1023), ((384, 3456), 2101), ((3456, 384), 1989)]:
        plan = proc384.plan(msgs, [size])
        assert sum(plan.images_seq_mask) == n_img
        assert plan.input_ids.count(IMG) == n_img


def test_cropping_only_up_to_two_images(proc384):
    two = proc384.plan([user("<image><image>"), assistant("a")], [(768, 768), (768, 384)])
    assert two.spatial_crop == [[2, 2], [2, 1]]
    three = proc384.plan([user("<image><image><image>"), assistant("a")], [(768, 768)] * 3)
    assert three.spatial_crop == [[1, 1]] * 3  # > 2 images: one local tile each
    assert sum(three.images_seq_mask) == 3 * 421


# ----------------------------------------------------------------------------------------------- pixels


def test_image_to_tensor_values():
    x = image_to_tensor(Image.new("RGB", (2, 1), (255, 0, 127)), (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (3, 1, 2) and x.dtype == torch.float32
    expected = torch.tensor([1.0, -1.0, (127 / 255 - 0.5) / 0.5])
    assert torch.allclose(x[:, 0, 0], expected, atol=1e-7)
    raw = image_to_tensor(Image.new("RGB", (1, 1), (51, 102, 255)), (0.5,) * 3, (0.5,) * 3, normalize=False)
    assert torch.allclose(raw[:, 0, 0], torch.tensor([0.2, 0.4, 1.0]))


RED, BLUE, GREEN, YELLOW = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)


def norm(rgb):
    return torch.tensor([(c / 255 - 0.5) / 0.5 for c in rgb])


def halves(w, h, first, second, vertical):
    img = Image.new("RGB", (w, h), first)
    img.paste(second, (w // 2, 0, w, h) if vertical else (0, h // 2, w, h))
    return img


def test_tiles_row_major_wide(proc):
    img = halves(64, 32, RED, BLUE, vertical=True)  # left red, right blue -> best 64x32: tw=2, th=1
    enc = proc.encode([user("<image>"), assistant("a")], [img])
    assert enc["images_spatial_crop"].tolist() == [[2, 1]]
    assert enc["images"].shape == (3, 3, 32, 32)  # global + 2 local
    assert torch.allclose(enc["images"][1][:, 16, 16], norm(RED))
    assert torch.allclose(enc["images"][2][:, 16, 16], norm(BLUE))
    # Global view: 64x32 fitted into 32x32 -> 32x16 centred, grey (127) bands above and below.
    glob = enc["images"][0]
    assert torch.allclose(glob[:, 2, 16], norm((127, 127, 127)))
    assert torch.allclose(glob[:, 16, 4], norm(RED)) and torch.allclose(glob[:, 16, 28], norm(BLUE))


def test_tiles_row_major_quadrants(proc):
    img = Image.new("RGB", (64, 64), RED)
    img.paste(BLUE, (32, 0, 64, 32))
    img.paste(GREEN, (0, 32, 32, 64))
    img.paste(YELLOW, (32, 32, 64, 64))
    enc = proc.encode([user("<image>"), assistant("a")], [img])
    assert enc["images_spatial_crop"].tolist() == [[2, 2]]
    centres = [enc["images"][k][:, 16, 16] for k in range(1, 5)]
    for got, colour in zip(centres, (RED, BLUE, GREEN, YELLOW)):  # TL, TR, BL, BR
        assert torch.allclose(got, norm(colour))


def test_tiles_tall_padded(proc):
    img = halves(32, 48, RED, BLUE, vertical=False)  # 32x48 -> best 32x64 (th=2), padded with grey
    enc = proc.encode([user("<image>"), assistant("a")], [img])
    assert enc["images_spatial_crop"].tolist() == [[1, 2]]
    top, bottom = enc["images"][1], enc["images"][2]
    # 32x48 fits 32x64 unscaled (scale = min(32/32, 64/48) = 1), centred: 8 grey rows on each side.
    assert torch.allclose(top[:, 2, 16], norm((127, 127, 127)))
    assert torch.allclose(top[:, 20, 16], norm(RED))
    assert torch.allclose(bottom[:, 12, 16], norm(BLUE))
    assert torch.allclose(bottom[:, 30, 16], norm((127, 127, 127)))


def test_non_rgb_image_is_converted(proc):
    enc = proc.encode([user("<image>"), assistant("a")], [Image.new("L", (32, 32), 255)])
    assert enc["images"].shape == (2, 3, 32, 32)
    assert torch.allclose(enc["images"][1][:, 5, 5], torch.ones(3))


# ------------------------------------------------------------------------------------------------ layout


def test_exact_layout_single_turn(proc, raw_tok):
    msgs = [user("<image>\nWhat colour is the shape?"), assistant("red")]
    enc = proc.encode(msgs, [solid(32, 32)])
    # Pieces tokenized separately, as the official tokenize_with_images does: "<|User|>: " | image |
    # "\nWhat colour is the shape?\n\n<|Assistant|>:" | "red" + eos.
    prompt = [BOS, USER] + tk(raw_tok, ": ") + [IMG] * 41
    prompt += tk(raw_tok, "\nWhat colour is the shape?\n\n") + [ASSISTANT] + tk(raw_tok, ":")
    answer = tk(raw_tok, "red") + [EOS]
    assert enc["input_ids"].tolist() == prompt + answer
    assert enc["labels"].tolist() == [-100] * len(prompt) + answer
    assert enc["images_seq_mask"].tolist() == [t == IMG for t in prompt + answer]
    assert enc["input_ids"].dtype == torch.long and enc["images_seq_mask"].dtype == torch.bool
    assert enc["images"].shape == (2, 3, 32, 32) and enc["images"].dtype == torch.float32
    assert enc["images_spatial_crop"].tolist() == [[1, 1]] and enc["images_spatial_crop"].dtype == torch.long


def test_exact_layout_multi_turn_system(proc, raw_tok):
    msgs = [
        {"role": "system", "content": "  Be brief. "},
        user(" <image>\nQ1 "),
        assistant(" A1 "),
        user("Q2 <image> and <image>"),
        assistant("A2"),
    ]
    imgs = [solid(32, 32), solid(64, 32), solid(32, 64)]  # 3 images: no cropping, 41 tokens each
    enc = proc.encode(msgs, imgs)
    system = tk(raw_tok, "Be brief.")  # stripped; no separator follows (official behaviour)
    turn1 = [USER] + tk(raw_tok, ": ") + [IMG] * 41 + tk(raw_tok, "\nQ1\n\n") + [ASSISTANT] + tk(raw_tok, ":")
    ans1 = tk(raw_tok, "A1") + [EOS]
    turn2 = [USER] + tk(raw_tok, ": Q2 ") + [IMG] * 41 + tk(raw_tok, " and ") + [IMG] * 41
    turn2 += tk(raw_tok, "\n\n") + [ASSISTANT] + tk(raw_tok, ":")
    ans2 = tk(raw_tok, "A2") + [EOS]
    assert enc["input_ids"].tolist() == [BOS] + system + turn1 + ans1 + turn2 + ans2
    masked = [-100] * (1 + len(system) + len(turn1))
    assert enc["labels"].tolist() == masked + ans1 + [-100] * len(turn2) + ans2
    assert enc["images_spatial_crop"].tolist() == [[1, 1]] * 3
    assert enc["images"].shape == (6, 3, 32, 32)
    expected = "<｜begin▁of▁sentence｜>Be brief.<|User|>: <image>\nQ1\n\n<|Assistant|>:A1<｜end▁of▁sentence｜>"
    expected += "<|User|>: Q2 <image> and <image>\n\n<|Assistant|>:A2<｜end▁of▁sentence｜>"
    assert proc.render(msgs) == expected
    assert proc.decode(enc["input_ids"], enc["images_spatial_crop"]) == expected


def test_decode_splits_adjacent_images(proc):
    msgs = [user("<image><image>x"), assistant("y")]
    enc = proc.encode(msgs, [solid(32, 32), solid(64, 32)])  # 41 + 57 image tokens back to back
    assert enc["images_spatial_crop"].tolist() == [[1, 1], [2, 1]]
    text = "<｜begin▁of▁sentence｜><|User|>: <image><image>x\n\n<|Assistant|>:y<｜end▁of▁sentence｜>"
    assert proc.decode(enc["input_ids"], enc["images_spatial_crop"]) == text
    assert proc.render(msgs) == text


def test_empty_user_content_template(proc, raw_tok):
    enc = proc.encode([user("  "), assistant("a")])
    assert enc["input_ids"].tolist() == [BOS, USER] + tk(raw_tok, ":") + [ASSISTANT] + tk(raw_tok, ":a") + [EOS]
    assert proc.render([user(""), assistant("a")]).startswith("<｜begin▁of▁sentence｜><|User|>:<|Assistant|>:")


def test_no_images_placeholder_tensors(proc):
    enc = proc.encode([user("hi"), assistant("yo")])
    assert torch.equal(enc["images"], torch.zeros(1, 3, 32, 32))
    assert torch.equal(enc["images_spatial_crop"], torch.zeros(1, 2, dtype=torch.long))
    assert not enc["images_seq_mask"].any()


def test_generation_prompt(proc):
    msgs = [user("<image>\nWhat colour is the shape?"), assistant("red")]
    train = proc.encode(msgs, [solid(32, 32)])
    gen = proc.encode(msgs, [solid(32, 32)], generation=True)
    gen_open = proc.encode(msgs[:1], [solid(32, 32)], generation=True)
    n_answer = 2  # "red" (one token) + eos
    assert gen["input_ids"].tolist() == train["input_ids"][:-n_answer].tolist()
    assert torch.equal(gen["input_ids"], gen_open["input_ids"])
    assert proc.decode(gen["input_ids"]).endswith("shape?\n\n<|Assistant|>:")
    assert torch.equal(gen["images"], train["images"])


def test_mask_prompt_false(proc):
    enc = proc.encode([user("<image>hi"), assistant("a")], [solid(32, 32)], mask_prompt=False)
    ids, labels = enc["input_ids"], enc["labels"]
    # images and bos stay masked; the prompt text is supervised
    assert (labels[enc["images_seq_mask"]] == -100).all() and labels[0] == -100
    text = ~enc["images_seq_mask"]
    text[0] = False
    assert torch.equal(labels[text], ids[text])


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "messages, n_images, reason",
    [
        ([user("<image>"), assistant("a")], 0, "image_count_mismatch"),
        ([user("hi"), assistant("a")], 1, "image_count_mismatch"),
        ([{"role": "bot", "content": "x"}, assistant("a")], 0, "unknown_role"),
        ([user("q"), {"role": "system", "content": "s"}, assistant("a")], 0, "system_not_first"),
        ([user("q"), assistant("<image>")], 1, "image_in_wrong_turn"),
        ([user("q")], 0, "no_assistant_turn"),
        ([assistant("a")], 0, "no_user_turn"),  # generation=True below: nothing left to prompt with
        ([], 0, "bad_schema"),
        ([{"role": "user"}], 0, "bad_schema"),
        ([user(3), assistant("a")], 0, "bad_schema"),
        ([user("\ud800"), assistant("a")], 0, "bad_schema"),
    ],
)
def test_sample_errors(proc, messages, n_images, reason):
    with pytest.raises(SampleError) as info:
        proc.encode(messages, [solid(32, 32)] * n_images, generation=reason == "no_user_turn")
    assert info.value.reason == reason


def test_overlong_policies(proc):
    msgs = [user("<image>\nWhat colour is the shape?"), assistant("red green blue yellow")]
    full = proc.encode(msgs, [solid(32, 32)])
    n = len(full["input_ids"])
    answer_start = int((full["labels"] != -100).nonzero()[0])
    image_end = int(full["images_seq_mask"].nonzero()[-1]) + 1
    for policy in ("error", "skip"):
        with pytest.raises(SampleError) as info:
            proc.encode(msgs, [solid(32, 32)], max_length=n - 1, overlong=policy)
        assert info.value.reason == "overlong"
    cut = proc.encode(msgs, [solid(32, 32)], max_length=answer_start + 1, overlong="truncate")
    assert cut["input_ids"].tolist() == full["input_ids"][: answer_start + 1].tolist()
    assert cut["labels"].tolist() == full["labels"][: answer_start + 1].tolist()
    assert cut["images"].shape == full["images"].shape
    with pytest.raises(SampleError) as info:
        proc.encode(msgs, [solid(32, 32)], max_length=answer_start, overlong="truncate")
    assert info.value.reason == "overlong_no_labels"
    with pytest.raises(SampleError) as info:
        proc.encode(msgs, [solid(32, 32)], max_length=image_end - 1, overlong="truncate")
    assert info.value.reason == "overlong_cuts_image"
    with pytest.raises(SampleError) as info:
        proc.encode(msgs, [solid(32, 32)], generation=True, max_length=image_end, overlong="truncate")
    assert info.value.reason == "overlong"
    assert len(proc.encode(msgs, [solid(32, 32)], max_length=n, overlong="error")["input_ids"]) == n
    assert proc.check(msgs, [(32, 32)], max_length=answer_start + 1, overlong="truncate") == answer_start + 1


# ---------------------------------------------------------------------------------------------- collator


def fake(ids, labels, n_tiles, crops):
    ids = torch.tensor(ids)
    return {
        "input_ids": ids,
        "labels": torch.tensor(labels),
        "images_seq_mask": ids == IMG,
        "images": torch.ones(n_tiles, 3, 2, 2),
        "images_spatial_crop": torch.tensor(crops),
    }


@pytest.fixture
def two_samples():
    a = fake([0, 3, 3, 5, 6], [-100, -100, -100, 5, 6], 2, [[1, 1]])
    b = fake([0, 7, 1], [-100, 7, 1], 1, [[0, 0]])
    return [a, b]


def test_collator_right(two_samples):
    batch = Collator(pad_id=PAD, padding_side="right")(two_samples)
    assert batch["input_ids"].tolist() == [[0, 3, 3, 5, 6], [0, 7, 1, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 5, 6], [-100, 7, 1, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]
    assert batch["images_seq_mask"].tolist() == [[False, True, True, False, False], [False] * 5]
    assert batch["images"].shape == (2, 2, 3, 2, 2)
    assert batch["images"][1, 0].eq(1).all() and batch["images"][1, 1].eq(0).all()
    assert batch["images_spatial_crop"].tolist() == [[[1, 1]], [[0, 0]]]


def test_collator_left(two_samples):
    batch = Collator(pad_id=PAD, padding_side="left")(two_samples)
    assert batch["input_ids"].tolist() == [[0, 3, 3, 5, 6], [2, 2, 0, 7, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 5, 6], [-100, -100, -100, 7, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert batch["images_seq_mask"].tolist() == [[False, True, True, False, False], [False] * 5]


def test_collator_pads_image_counts(proc):
    one = proc.encode([user("<image>a"), assistant("b")], [solid(64, 32)])  # 3 tiles, 1 image
    three = proc.encode([user("<image><image><image>"), assistant("b")], [solid(32, 32)] * 3)  # 6 tiles
    batch = Collator(proc.pad_id)([one, three])
    assert batch["images"].shape == (2, 6, 3, 32, 32)
    assert batch["images_spatial_crop"].tolist() == [[[2, 1], [0, 0], [0, 0]], [[1, 1], [1, 1], [1, 1]]]
    # the model consumes exactly one image token per formatted feature: mask count == formula
    assert batch["images_seq_mask"][0].sum() == 57 and batch["images_seq_mask"][1].sum() == 3 * 41


def test_collator_passes_strings(two_samples):
    for s, answer in zip(two_samples, ("red", "left")):
        s["answer"] = answer
    batch = Collator(PAD)(two_samples)
    assert batch["answer"] == ["red", "left"]
    with pytest.raises(ValueError):
        Collator(PAD, padding_side="middle")
