"""One log format for every component, so interleaved output from `inferoxy serve` stays readable."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, component: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s [{component}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log would print a line per request: far too much at thousands per second.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
