"""Run train.py under torchrun and write each rank's final exit weights and world size (for train_test.py).

    TRAIN_CHECK_DIR=/tmp/ranks torchrun --standalone --nproc_per_node 2 train_ddp_check.py [train.py flags]

writes rank{R}.safetensors and rank{R}.json ({"rank", "world_size"}) into $TRAIN_CHECK_DIR.
"""
import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

import train

if __name__ == "__main__":
    result = train.run(train.build_parser().parse_args(sys.argv[1:]))
    out = Path(os.environ["TRAIN_CHECK_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    rank = result["rank"]
    save_file({k: v.detach().contiguous() for k, v in result["exit"].state_dict().items()},
              str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": result["world_size"],
                                                      "env_world_size": int(os.environ.get("WORLD_SIZE", 1))}))
