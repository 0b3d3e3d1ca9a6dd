"""HF checkpoint conversion and loading (importable as `focus_jax.checkpoints_convert`).

- `convert_hf_checkpoint`: HF safetensors dir -> self-contained Orbax checkpoint (streaming, atomic).
- `load_checkpoint` / `load_hf` / `load_model`: parameters restored onto the target shardings.
"""

from focus_jax.checkpoints_convert.convert import (CheckpointMismatchError, check_tensors,
                                                   convert_hf_checkpoint)
from focus_jax.checkpoints_convert.load import (is_converted_dir, is_hf_dir, load_checkpoint,
                                                load_hf, load_model, read_model_config)
from focus_jax.checkpoints_convert.safetensors_io import SafetensorsError

__all__ = ["CheckpointMismatchError", "SafetensorsError", "check_tensors",
           "convert_hf_checkpoint", "is_converted_dir", "is_hf_dir", "load_checkpoint", "load_hf",
           "load_model", "read_model_config"]
