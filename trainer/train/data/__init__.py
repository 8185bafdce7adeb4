"""The data pipeline: files, S3 prefixes or hub datasets -> token rows for one training stage.

loader      read one `DatasetSpec` into raw rows (JSON/JSONL/Parquet/CSV, LMFlow, hub)
aligners    normalise every format to one internal form (messages/tools/text)
templates   built-in chat templates; `apply_template` picks the run's template
processors  one per stage: tokenization, prompt masking, truncation; packing
pipeline    `build_datasets`: load, align, eval split, mix, shuffle, tokenize, pack
collator    batches for `transformers.Trainer`
"""

from kubetune.trainer.train.data.aligners import ALIGNERS, CHAT_FEATURES
from kubetune.trainer.train.data.collator import DataCollator, make_collator
from kubetune.trainer.train.data.pipeline import DataBundle, build_datasets
from kubetune.trainer.train.data.processors import IGNORE_INDEX, PROCESSORS
from kubetune.trainer.train.data.templates import TEMPLATES, apply_template, describe_templates

__all__ = [
    "ALIGNERS",
    "CHAT_FEATURES",
    "IGNORE_INDEX",
    "PROCESSORS",
    "TEMPLATES",
    "DataBundle",
    "DataCollator",
    "apply_template",
    "build_datasets",
    "describe_templates",
    "make_collator",
]
