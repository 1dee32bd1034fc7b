"""Where this process runs: its rank in the job (from `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, as torchrun and
`deepspeed --no_local_rank` set them: Hydra's command line never sees `--local_rank`) and its device."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


class EngineError(RuntimeError):
    """The requested engine cannot run here; the message says what to install or change."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> DistEnv:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """auto: cuda:$LOCAL_RANK when CUDA is available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise EngineError("trainer.device=cuda but CUDA is not available; use trainer.device=auto or cpu")
        return torch.device("cuda", env.local_rank)
    return torch.device(name)


def free_port() -> int:
    """A TCP port free on this host now (for MASTER_PORT of a one-machine process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
