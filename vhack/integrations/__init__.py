"""Drop-in use of the projector in existing trainers and under data parallelism.

- `VHackCallback`: a transformers TrainerCallback (Trainer, TRL trainers) that projects once per
  optimizer step and logs cin; its trainer's checkpoints and save_model hold the adapter files
  (`vhack.integrations.checkpoints`).
- `ShardedProjector`, `all_reduce_grad`: the projection when dS is sharded or replicated across
  processes (torch.distributed: DDP, FSDP2).
- `merged_named_parameters`, `merged_state_dict`, `patch_vllm_sync`: merged dense weights under
  the base model's names (vLLM weight sync).
- `ZeroDeltaReference`, `use_zero_delta_reference`, `zero_delta`: the dS = 0 model as the KL
  reference.

Importing this package needs transformers only; TRL and accelerate are optional (`pip install
"vhack-kernels[trl]"`).
"""

from vhack.integrations.callback import METRIC_PREFIX, VHackCallback
from vhack.integrations.distributed import ShardedProjector, all_reduce_grad, fsdp2_shard_range
from vhack.integrations.reference_model import (
    ZeroDeltaReference,
    use_zero_delta_reference,
    zero_delta,
)
from vhack.integrations.weights import merged_named_parameters, merged_state_dict, patch_vllm_sync

__all__ = [
    "METRIC_PREFIX",
    "ShardedProjector",
    "VHackCallback",
    "ZeroDeltaReference",
    "all_reduce_grad",
    "fsdp2_shard_range",
    "merged_named_parameters",
    "merged_state_dict",
    "patch_vllm_sync",
    "use_zero_delta_reference",
    "zero_delta",
]
