"""rankbias: reproduce 'SGD and weight decay secretly minimise the rank of your neural network'."""
__version__ = "0.1.0"
