"""Pipeline steps: batch transforms of records that write one named field each."""

from captionkit.steps.base import Prepared, Step, is_out_of_memory

__all__ = ["Prepared", "Step", "is_out_of_memory"]
