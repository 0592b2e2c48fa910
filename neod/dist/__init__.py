"""Tensor parallelism (Megatron-style) for the Llama model: weight sharding and the TP wrapper."""
