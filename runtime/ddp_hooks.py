"""DDP's built-in C++ comm hooks, refused on a ringlib group with a clear error.

They take the result of a Python process group's allreduce for a C++ tensor list, which
it is not (a Python list), and fail with an internal assert inside backward. torch's
Python hooks (default_hooks.fp16_compress_hook, ...) do the same work and run.
"""

from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel

from ringlib.errors import NotSupported

from .process_group import RingProcessGroup


def refuse_builtin_comm_hooks() -> None:
    """Make DistributedDataParallel._register_builtin_comm_hook raise NotSupported for a
    model on a ringlib group, and work as before for any other. Idempotent."""
    builtin = DistributedDataParallel._register_builtin_comm_hook
    if getattr(builtin, "ringlib_refuses", False):
        return

    def register(ddp: DistributedDataParallel, comm_hook_type: Any) -> None:
        if isinstance(ddp.process_group, RingProcessGroup):
            raise NotSupported(f"the ringlib backend does not run DDP's built-in C++ comm hook "
                               f"{comm_hook_type}; register torch's Python hook instead, such "
                               "as default_hooks.fp16_compress_hook")
        builtin(ddp, comm_hook_type)

    register.ringlib_refuses = True
    register.__doc__ = builtin.__doc__
    DistributedDataParallel._register_builtin_comm_hook = register
