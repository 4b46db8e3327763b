"""Data sources for fitting, evaluating and training: bundled MNIST, tensor files, python."""

from mergecli.data.batches import TensorData, TokenBatch
from mergecli.data.mnist import mnist_arrays
from mergecli.data.sources import load_data

__all__ = ["TensorData", "TokenBatch", "load_data", "mnist_arrays"]
