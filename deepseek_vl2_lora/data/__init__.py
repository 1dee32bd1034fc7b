"""Training and eval data: sources (`records`), record layouts (`layouts`), images (`images`), validated datasets
(`datasets`), the data report (`report`), bad samples at train time (`bad_samples`) and mixtures of training
sources (`mixture`)."""

from .bad_samples import ON_BAD_SAMPLE, CollateItems, SkipBadSamples, TrainItem, unwrap_batch
from .datasets import EvalDataset, Sample, SFTDataset, collate_eval, convert_llava, parse_record
from .images import ImageRef, load_image, resolve_image
from .layouts import LLAVA_ROLES
from .mixture import Mixture
from .records import RecordSource, open_source, read_records
from .report import DataReport

__all__ = [
    "ON_BAD_SAMPLE",
    "LLAVA_ROLES",
    "Mixture",
    "CollateItems",
    "DataReport",
    "EvalDataset",
    "ImageRef",
    "RecordSource",
    "SFTDataset",
    "Sample",
    "SkipBadSamples",
    "TrainItem",
    "collate_eval",
    "convert_llava",
    "load_image",
    "open_source",
    "parse_record",
    "read_records",
    "resolve_image",
    "unwrap_batch",
]
