"""The benchmark's public names in one place, for scripts that import them from here:
items and the folder (:mod:`raypipe.evaluate.items`), real-image imports
(:mod:`raypipe.evaluate.import_real`) and the training-overlap filter
(:mod:`raypipe.evaluate.overlap`)."""

from raypipe.evaluate.import_real import ImportReport, import_real
from raypipe.evaluate.items import (
    BENCHMARK_COLUMNS,
    BENCHMARK_QUESTION_TYPES,
    BENCHMARK_SCHEMA,
    MATCH_RULES,
    BenchmarkWriter,
    item_id,
    items_from_samples,
    items_to_table,
    read_benchmark,
    read_benchmark_rejects,
    read_benchmark_report,
    validate_items,
    write_benchmark,
)
from raypipe.evaluate.overlap import overlap_filter, read_training_prompts

__all__ = [
    "BENCHMARK_COLUMNS",
    "BENCHMARK_QUESTION_TYPES",
    "BENCHMARK_SCHEMA",
    "MATCH_RULES",
    "BenchmarkWriter",
    "ImportReport",
    "import_real",
    "item_id",
    "items_from_samples",
    "items_to_table",
    "overlap_filter",
    "read_benchmark",
    "read_benchmark_rejects",
    "read_benchmark_report",
    "read_training_prompts",
    "validate_items",
    "write_benchmark",
]
