"""Datasets: the shared record schema, the embedded synthetic benchmark and local MMEB/ViDoRe loaders."""
from .records import (
    IMAGE_PLACEHOLDER,
    Benchmark,
    DocRetrievalTask,
    EvalQuery,
    EvalTask,
    Item,
    TrainExample,
)

__all__ = [
    "IMAGE_PLACEHOLDER",
    "Benchmark",
    "DocRetrievalTask",
    "EvalQuery",
    "EvalTask",
    "Item",
    "TrainExample",
]
