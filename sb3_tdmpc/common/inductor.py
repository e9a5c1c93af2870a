"""
Inductor settings of the compiled paths (``torch_compile=True``), imported only when compiling (the
import of ``torch._inductor`` takes seconds).
"""

from __future__ import annotations

from typing import Any

from torch._functorch.partitioners import default_partition
from torch._inductor.custom_graph_pass import CustomPartitionerFn


class SaveActivationsPartitioner(CustomPartitionerFn):
    """
    AOTAutograd's ``default_partition`` as Inductor's partitioner: the backward graph reads every
    forward activation it needs. Inductor's own (``min_cut_rematerialization_partition``) saves
    fewer and recomputes the rest from the layer inputs, which suits GPUs' memory bandwidth; on CPU
    it runs LayerNorm and the exps of tanh and ELU again, inside the backward's column reductions.
    """

    def __call__(self, gm: Any, joint_inputs: Any, **kwargs: Any) -> Any:
        kwargs.pop("compiler", None)
        return default_partition(gm, joint_inputs, **kwargs)

    def uuid(self) -> str:
        return "sb3_tdmpc.SaveActivationsPartitioner.v1"
