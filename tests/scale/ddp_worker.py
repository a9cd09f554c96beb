"""Worker for ``test_ddp``: ``torchrun --standalone --nproc_per_node 2 ddp_worker.py CONFIG.json INFO.json``.

Each process builds the trainer from the JSON config with ``Accelerator(cpu=True)`` (gloo), runs it,
and the main process writes the world size and the processes' ranks to INFO.json.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


def main(config_path: str, info_path: str) -> None:
    from accelerate import Accelerator

    from scale.config import load_config
    from scale.train import Trainer

    acc = Accelerator(cpu=True)
    trainer = Trainer(load_config(config_path), accelerator=acc)
    result = trainer.run()
    ranks = acc.gather(torch.tensor([acc.process_index])).tolist()
    if acc.is_main_process:
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        with open(info_path, "w") as fh:
            json.dump({"world_size": acc.num_processes, "ranks": ranks, "status": result.status,
                       "backend": backend}, fh)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
