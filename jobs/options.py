"""What a batch job is asked to do: the one set of options ``inferoxy batch``, ``POST /v2/jobs`` and the job
worker share (docs/JOBS.md lists each)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from model_manager.spec import NAME_PATTERN

InputFormat = Literal["auto", "parquet", "csv", "images"]


class BatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=NAME_PATTERN)
    version: str | None = Field(None, pattern=NAME_PATTERN, description="Unset: the model's default version.")
    input: str = Field(min_length=1, max_length=2048, description="A local path or an s3:// URL: a parquet file or "
                       "folder of parquet files, a CSV file, or a folder of images.")
    output: str = Field(min_length=1, max_length=2048, description="Where the results go (local path or s3:// URL).")
    input_format: InputFormat = Field("auto", description="auto: told by the input's path.")
    inputs: dict[str, str] = Field(default_factory=dict, max_length=64, description="Model input name -> column, "
                                   "where they differ (--input NAME=COLUMN).")
    key_column: str | None = Field(None, max_length=256, description="A column copied to the output to tell rows "
                                   "apart; unset: the row's index in the input.")
    batch_size: int = Field(32, ge=1, le=65536, description="Rows per request.")
    max_samples: int | None = Field(None, ge=1, description="Stop after this many input rows.")
    concurrency: int | None = Field(None, ge=1, le=4096, description="Requests in flight; unset: enough to fill "
                                    "the model's batches.")
    storage_options: dict[str, str] = Field(default_factory=dict, max_length=32, description="fsspec options for "
                                            "s3:// (key, secret, token, endpoint_url, region...).")
    part_rows: int = Field(10_000, ge=1, le=10_000_000, description="Rows per output part: the most a resumed job "
                           "does again.")
    resume: bool = Field(False, description="Continue a stopped job from its checkpoint in the output.")
