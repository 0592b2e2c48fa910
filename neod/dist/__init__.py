"""Tensor parallelism (Megatron-style) across the GPUs of one host: weight sharding (sharding),
the sharded model (tp_model), the ranks' processes (launch on rank 0, follower on the others),
their group (group) and the messages rank 0 sends them (messages)."""
