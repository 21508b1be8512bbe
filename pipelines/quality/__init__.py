"""Image-quality filter: is a downloaded image genuinely sharp, clean and large enough to be a
restoration *target*? Split along its layers:

- `measures`: pure functions over a decoded numpy image (sharpness, noise, blockiness, JPEG
  quality, ...; `measure_stages` takes them in groups, cheapest first);
- `judge`: the thresholds (`QualityConfig`), the decision with its reasons (`judge`) and
  `assess`, which decodes, measures and judges one image;
- `learned`: learned no-reference IQA models (protocol, registry, `TorchIQA`);
- `dataset`: WebDataset tars as rows, their scoring, and the Ray Data stages (the learned-IQA
  stage of the data pipeline; `score_quality`/`filter_quality` over existing tars).

The public names of each are importable from here.
"""

from pipelines.quality.dataset import (
    DOWNLOADED_SAMPLE_SCHEMA,
    SCORED_SCHEMA,
    filter_quality,
    iter_tar_samples,
    learned_iqa_stage,
    list_tars,
    read_tars,
    score_quality,
    score_rows,
    split_quality,
)
from pipelines.quality.judge import CHECKS, Decoded, QualityConfig, QualityResult, assess, assess_batch, judge
from pipelines.quality.learned import (
    LEARNED_IQA,
    LearnedIQA,
    LearnedIQAConfig,
    TorchIQA,
    learned_iqa_class,
    load_learned_iqa,
    register_learned_iqa,
)
from pipelines.quality.measures import (
    DETAIL_LEVEL,
    NORM_SIDE,
    SCORE_NAMES,
    SCORE_TYPES,
    blockiness,
    effective_short_side,
    flat_fraction,
    hf_energy_ratio,
    jpeg_quality,
    luminance_stats,
    measure_stages,
    noise_sigma,
    sharpness,
    to_gray,
)

__all__ = [
    "CHECKS",
    "DETAIL_LEVEL",
    "Decoded",
    "DOWNLOADED_SAMPLE_SCHEMA",
    "LEARNED_IQA",
    "NORM_SIDE",
    "SCORED_SCHEMA",
    "SCORE_NAMES",
    "SCORE_TYPES",
    "LearnedIQA",
    "LearnedIQAConfig",
    "QualityConfig",
    "QualityResult",
    "TorchIQA",
    "assess",
    "assess_batch",
    "blockiness",
    "effective_short_side",
    "filter_quality",
    "flat_fraction",
    "hf_energy_ratio",
    "iter_tar_samples",
    "jpeg_quality",
    "judge",
    "learned_iqa_stage",
    "list_tars",
    "learned_iqa_class",
    "load_learned_iqa",
    "luminance_stats",
    "measure_stages",
    "noise_sigma",
    "read_tars",
    "register_learned_iqa",
    "score_quality",
    "score_rows",
    "sharpness",
    "split_quality",
    "to_gray",
]
