"""Runs a function on P gloo processes on this machine (127.0.0.1 only) and brings back what
each rank returned, or the traceback it raised; a run that outlives its deadline is killed
and reported as hung (so a test fails instead of waiting forever)."""
from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankError(Exception):
    """What a rank raised, carried back to the parent: its type name, message and traceback."""

    def __init__(self, kind: str, message: str, tb: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.tb = kind, message, tb


def _worker(rank: int, fn: Callable, size: int, port: int, out: str, pg_timeout: float,
            args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result: Any
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=size, timeout=datetime.timedelta(seconds=pg_timeout))
        result = {"ok": fn(rank, size, *args)}
    except BaseException as e:   # noqa: BLE001 - carried back to the test
        result = {"error": (type(e).__name__, str(e), traceback.format_exc())}
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    with contextlib.suppress(Exception):   # a group broken by a failed collective
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, size: int, *args: Any, deadline: float = 240.0,
              pg_timeout: float = 60.0) -> list[Any]:
    """``[fn(rank, size, *args) for rank in range(size)]``, each in its own spawned process with
    a gloo process group; a rank that raised gives a :class:`RankError` in its place."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="embgrad-dist-") as out:
        ctx = mp.spawn(_worker, args=(fn, size, free_port(), out, pg_timeout, args), nprocs=size,
                       join=False)
        end = time.monotonic() + deadline
        while not ctx.join(timeout=1.0):
            if time.monotonic() > end:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise AssertionError(f"{size} ranks did not finish within {deadline:.0f} s: hung")
        results = []
        for r in range(size):
            path = Path(out) / f"rank{r}.pkl"
            if not path.exists():
                raise AssertionError(f"rank {r} died without a result")
            res = pickle.loads(path.read_bytes())
            results.append(res["ok"] if "ok" in res else RankError(*res["error"]))
        return results
