"""The stage base: declared input columns are checked on the first batch."""

from __future__ import annotations

import pyarrow as pa
import pytest

from raypipe.errors import ConfigError
from raypipe.generate.prompts import DedupStage, PromptWriter
from raypipe.stage import Stage


class Upper(Stage):
    INPUT_COLUMNS = ("id", "prompt")

    def process(self, batch: pa.Table) -> pa.Table:
        return batch.set_column(1, "prompt", pa.array([p.upper() for p in batch["prompt"].to_pylist()]))


def test_missing_input_column_is_named_on_the_first_batch():
    stage = Upper()
    with pytest.raises(ConfigError, match=r"Upper: required input columns \['prompt'\] not found"):
        stage(pa.table({"id": ["a"], "text": ["x"]}))
    out = stage(pa.table({"id": ["a"], "prompt": ["x"]}))
    assert out["prompt"].to_pylist() == ["X"]


def test_generation_stages_declare_what_they_read():
    assert set(PromptWriter.INPUT_COLUMNS) == {"ability", "chunk", "indices", "ids", "chunk_keywords"}
    assert {"id", "ability", "index", "prompt"} <= set(DedupStage.INPUT_COLUMNS)
    with pytest.raises(ConfigError, match="DedupStage"):
        DedupStage(planner=None)(pa.table({"id": ["a"]}))
