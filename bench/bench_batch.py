"""Batch jobs against the ZeroMQ bridge: the digits model over N rows (docs/PERFORMANCE.md, "Batch jobs").

Two ways through one proxy (``inferoxy serve``, process runtime, models.yaml), in the same run, alternated:

- bridge: the rows already in memory, sent by an ``AsyncClient`` as ``batch-size``-row requests with
  ``concurrency`` in flight (the ceiling: no reading, no conversion, no writing);
- batch: ``run_batch`` (what ``inferoxy batch`` runs) from a local parquet file to a parquet output, with the same
  request size and concurrency.

    python bench/bench_batch.py                  # 100,000 rows, 32 a request, 8 in flight, 2 rounds
    python bench/bench_batch.py --rows 20000 --rounds 1

Prints one JSON object: rows/s of each, per round and best, and the ratio batch / bridge (target >= 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from examples.train_digits import held_out_split  # noqa: E402
from inferoxy.client import AsyncClient  # noqa: E402
from jobs.options import BatchOptions  # noqa: E402
from jobs.runner import run_batch  # noqa: E402
from jobs.zmq_predictor import ZmqPredictor  # noqa: E402
from tests.support import ProxyProcess  # noqa: E402


def digits_rows(rows: int) -> np.ndarray:
    images, _ = held_out_split()
    return np.resize(images.astype(np.float32), (rows, 64))


async def bridge(url: str, images: np.ndarray, batch_size: int, concurrency: int) -> float:
    """Rows per second with the rows in memory."""
    async with AsyncClient(url, timeout=120) as client:
        starts = iter(range(0, len(images), batch_size))

        async def lane() -> None:
            for start in starts:  # the lanes share one iterator: each takes the next request
                await client.infer("digits", {"image": images[start:start + batch_size]})

        began = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return len(images) / (time.perf_counter() - began)


async def batch(url: str, data: Path, out: Path, batch_size: int, concurrency: int) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    predictor = ZmqPredictor(url)
    try:
        began = time.perf_counter()
        summary = await run_batch(BatchOptions(model="digits", input=str(data), output=str(out), batch_size=batch_size,
                                               concurrency=concurrency, inputs={"image": "pixels"}), predictor)
        seconds = time.perf_counter() - began
    finally:
        await predictor.aclose()
    assert summary.rows_ok == pq.ParquetFile(data).metadata.num_rows, summary
    return summary.rows_ok / seconds, summary.to_json()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    images = digits_rows(args.rows)
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        data = work / "digits.parquet"
        pq.write_table(pa.table({"pixels": pa.FixedSizeListArray.from_arrays(pa.array(images.ravel()), 64)}), data)
        results: dict[str, list[float]] = {"bridge": [], "batch": []}
        stages: list[dict] = []
        with ProxyProcess() as proxy:
            asyncio.run(bridge(proxy.zmq_url, images[:2000], args.batch_size, args.concurrency))  # warm up
            for _ in range(args.rounds):
                results["bridge"].append(asyncio.run(bridge(proxy.zmq_url, images, args.batch_size, args.concurrency)))
                rate, summary = asyncio.run(batch(proxy.zmq_url, data, work / "out", args.batch_size,
                                                  args.concurrency))
                results["batch"].append(rate)
                stages.append(summary["stages"])
        best = {name: max(rates) for name, rates in results.items()}
        print(json.dumps({
            "rows": args.rows, "batch_size": args.batch_size, "concurrency": args.concurrency,
            "rows_per_s": {name: [round(r) for r in rates] for name, rates in results.items()},
            "best": {name: round(rate) for name, rate in best.items()},
            "ratio_best": round(best["batch"] / best["bridge"], 3),
            "ratio_per_round": [round(b / r, 3) for b, r in zip(results["batch"], results["bridge"], strict=True)],
            "batch_stages_s": stages,
        }, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
