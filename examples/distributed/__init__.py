"""Distributed meta-training with DistributedDataParallel (launched by torchrun)."""
