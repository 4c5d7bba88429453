"""Pure functions behind ncp's classes, for users who build their own loops.

Every function takes tensors (and a module where a forward pass is needed) and returns
tensors; nothing is stored. Per-task parameters are dicts of ``(tasks, *shape)`` tensors.
"""

from __future__ import annotations

from ._bootstrap import parameter_distance as parameter_distance
from ._inner import first_order_steps as first_order_steps
from ._inner import sgd_update as sgd_update
from ._inner import task_gradients as task_gradients
from ._inner import task_losses as task_losses
from ._params import init_params as init_params
from ._params import per_task_norm as per_task_norm
from ._planning import saved_bytes as saved_bytes
from ._pruning import balanced_top_k_indices as balanced_top_k_indices
from ._pruning import gather_points as gather_points
from ._pruning import keep_count as keep_count
from ._pruning import top_k_indices as top_k_indices
from ._rescaling import safe_ratio as safe_ratio
from ._rescaling import scale_grads as scale_grads
from ._scoring import find_head as find_head
from ._scoring import linear_head_score as linear_head_score
from ._scoring import score_points as score_points

__all__ = [
    "balanced_top_k_indices",
    "find_head",
    "first_order_steps",
    "gather_points",
    "init_params",
    "keep_count",
    "linear_head_score",
    "parameter_distance",
    "per_task_norm",
    "safe_ratio",
    "saved_bytes",
    "scale_grads",
    "score_points",
    "sgd_update",
    "task_gradients",
    "task_losses",
    "top_k_indices",
]
