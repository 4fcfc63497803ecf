"""Dispatch by area: group a batch's rows by area once, then run every area's matmul in one grouped call.

One module per concern: ``groups`` (the grouping and the context a routed model lends its area layers),
``kernels`` (each per-area product and which one runs), ``functions`` (the operations layers call, with their
autograd functions), ``updates`` (updates taken inside the backward), ``memory`` (buffers recycled across steps)
and ``compile`` (``--compile``'s generated kernels).

The grouping of rows by area is made here; layers and rules use the ``Groups`` it returns rather than routing
indices of their own.

    groups = group_by_area(area, K)            # one stable sort per step (input routing: for every layer)
    rows = x[groups.order]                     # grouped: area 0's rows, then area 1's, ...
    y = grouped_linear(rows, groups, w, b)     # w (K, out, in), b (K, out): y[i] = rows[i] @ w[k_i].T + b[k_i]
    y[groups.inverse]                          # batch order again, once, at the output

Areas are one stacked ``(K, out, in)`` tensor per layer. On CPU, where areas hold few rows, the rows are
padded to the largest area's count and one batched matmul serves every area (2-4x faster than per-area kernels
below 32 rows per area); otherwise each non-empty area is one matmul, forward (bias in the same kernel) and weight
gradient (into a buffer recycled across steps): faster on CPU than ``torch._grouped_mm``, which a GPU runs over
the group offsets. Small banks (a head) are gathered: each row computes with a copy of its own area's weights.
Where areas hold many rows the shared path is folded into the areas' product. Areas no row used get a zero
gradient. Which areas a step used is recorded on the parameter (``touched_areas``: a (K,) bool
tensor, None when all were), so the optimizers of ``torchsal.optim`` update, and keep state for, exactly those
areas: an untouched area stays bit-identical. Plain SGD may apply each area's update inside its backward
(``stepping_in_backward``), and fused Adam may step each area from its gradient formed in cache. docs/design.md
gives the measurements behind each choice.
"""

from torchsal.dispatch.compile import compiled_call, compiled_kernels, few_rows
from torchsal.dispatch.functions import (
    LinearState,
    area_gradients,
    area_linear,
    grouped_conv2d,
    grouped_linear,
    learn_linear,
    local_linear,
)
from torchsal.dispatch.groups import Groups, current_groups, from_padded, group_by_area, host_counts, routed, to_padded
from torchsal.dispatch.memory import accumulate_gradient, give_memory, release_gradients, take_memory
from torchsal.dispatch.updates import (
    AreaStep,
    mark_touched,
    step_or_gradient,
    step_product_or_gradient,
    stepping_in_backward,
)

__all__ = ["AreaStep", "Groups", "LinearState", "accumulate_gradient", "area_gradients", "area_linear",
           "compiled_call", "compiled_kernels", "current_groups", "few_rows", "from_padded", "give_memory",
           "group_by_area", "grouped_conv2d", "grouped_linear", "host_counts", "learn_linear", "local_linear",
           "mark_touched", "release_gradients", "routed", "step_or_gradient", "step_product_or_gradient",
           "stepping_in_backward", "take_memory", "to_padded"]
