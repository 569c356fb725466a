"""A torch.distributed group of ranks on this machine, started as torchrun starts one (MASTER_ADDR, RANK, ...),
for the tests of multi-rank trials without Ray."""
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

from cluster.local import free_port

REPO = Path(__file__).resolve().parents[1]


class RankEnd(NamedTuple):
    returncode: int
    output: str          # stdout and stderr; ends with "(killed: timed out)" for a rank that ran past the timeout


def run_ranks(argv: Sequence[str], world_size: int, timeout: float, cpu: bool = True,
              paths: Sequence[str] = (), env: Optional[Dict[str, str]] = None) -> List[RankEnd]:
    """Run `python argv...` as ranks 0..world_size-1 of one group and wait for all; `cpu`: DeepSpeed's CPU
    accelerator and no GPU, also beside one; `paths` go on PYTHONPATH after the repository."""
    port, processes = free_port(), []
    for rank in range(world_size):
        rank_env = {**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                    "PYTHONPATH": os.pathsep.join([str(REPO), *map(str, paths), os.environ.get("PYTHONPATH", "")])}
        if cpu:
            rank_env.update({"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""})
        else:
            rank_env.pop("DS_ACCELERATOR", None)
        processes.append(subprocess.Popen([sys.executable, *map(str, argv)], env=rank_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    ends = []
    for process in processes:
        try:
            ends.append(RankEnd(0, process.communicate(timeout=timeout)[0]))
        except subprocess.TimeoutExpired:
            process.kill()
            ends.append(RankEnd(0, process.communicate()[0] + "\n(killed: timed out)"))
        ends[-1] = ends[-1]._replace(returncode=process.returncode)
    return ends
