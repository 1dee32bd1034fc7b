"""Training and eval data: the processor (`processor`: the chat template and labels; `tiling`; `collate`; `packing`;
the epoch order, `sampling`), sources (`records`), record layouts (`layouts`), images (`images`), validated datasets
(`datasets`) and their validation cache (`validation_cache`), the data report (`report`), bad samples at train time
(`bad_samples`), mixtures of training sources (`mixture`), and ``python -m deepseek_vl2_lora.data check FILE...``
(`check`): every bad line of a data set, without a model."""

from .bad_samples import ON_BAD_SAMPLE, CollateItems, SkipBadSamples, TrainItem, unwrap_batch
from .collate import Collator
from .datasets import EvalDataset, Sample, SFTDataset, collate_eval, convert_llava, parse_record
from .images import ImageLimits, ImageRef, load_image, probe_image, resolve_image
from .layouts import LLAVA_ROLES
from .mixture import Mixture
from .processor import DeepseekVL2Processor, SampleError
from .records import RecordSource, open_source, read_records
from .report import DataReport

__all__ = [
    "Collator",
    "DeepseekVL2Processor",
    "SampleError",
    "ON_BAD_SAMPLE",
    "LLAVA_ROLES",
    "Mixture",
    "CollateItems",
    "DataReport",
    "EvalDataset",
    "ImageLimits",
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
    "probe_image",
    "read_records",
    "resolve_image",
    "unwrap_batch",
]
