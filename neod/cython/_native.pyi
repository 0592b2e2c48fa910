DTYPE_FP16: int
DTYPE_BF16: int
HEAD_DIMS: tuple[int, ...]
AMX_SUPPORTED: bool

def use_amx(enabled: bool) -> bool: ...
def amx_in_use() -> bool: ...

class NativePool:
    def __init__(self, cores: list[int] | tuple[int, ...]) -> None: ...
    @property
    def cores(self) -> tuple[int, ...]: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def thread_ids(self) -> list[int]: ...
    def decode(
        self,
        q: int,
        kv: int,
        block_tables: int,
        seq_lens: int,
        k_new: int,
        v_new: int,
        out: int,
        lse: int,
        num_blocks: int,
        batch: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        max_blocks: int,
        dtype: int,
        scale: float,
        q_stride: int,
        kv_new_stride: int,
    ) -> float: ...
    def probe_read_bandwidth(
        self, nbytes: int, thread_counts: list[int], repeats: int
    ) -> list[float]: ...
