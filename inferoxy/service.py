"""The shape every Inferoxy component has, so one runner can start any of them.

A component is constructed with the settings and a shared ZeroMQ context (sharing it is
what lets ``inproc://`` endpoints work when components run in one process), then
``run(ready)`` is awaited: it binds its sockets, sets ``ready``, and serves until it is
cancelled, releasing everything it holds in ``finally``.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import zmq.asyncio

from inferoxy.settings import Settings


class Service(Protocol):
    name: str

    def __init__(self, settings: Settings, ctx: zmq.asyncio.Context) -> None: ...

    async def run(self, ready: asyncio.Event) -> None: ...
