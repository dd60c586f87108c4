"""Pallas kernels, installed as `zipjax.kernels`, each beside a plain jax.numpy reference it is tested against.

common               the leaf the kernels and the library share: mask value, grouped scores / softmax, the online
                     softmax (`SoftmaxState`, `online_softmax_step`, `merge_states`), slot visibility, packed-code
                     layout, and the wrapper convention's backend rule (imports jax and zipjax.platform only)
flash_attention      prefill and decode attention over a slot-addressed cache, reading only the visible key blocks
quantized_attention  decode attention over packed 2/4/8-bit KV codes (a `PackedSegment`), partial states merged
quantized_multi_query  the same kernel with several queries per sequence (ZipAR's rows, SJD's drafts), each query's
                     own visible slots; (out, lse) per query for merging with a dense band (`merge_lse`)
paged_packed_attention  decode attention over a serving pool's packed quantized pages (ZipCache, KIVI, uniform)
                     read through a page table; (out, lse) for merging with the dense tail
paged_dense_attention  attention over a serving pool's dense pages (K/V interleaved) read in place through a page
                     table, on a GPU (Triton; zipjax.serve.gpu_paged): decode rows and prefill blocks, GQA, window
zipar_attention      ZipAR's parallel-decoding attention (several queries per sequence, written-slot raster mask)
delta_matmul         ME-Switch's grouped dequantize-matmul: each row times its own expert's packed low-bit delta

Every entry point reads `name(arrays..., *, options..., backend=None, interpret=None, blocks=None)`: backend None is
the platform being traced for (a CPU runs the TPU form interpreted), interpret None interprets on a CPU only, and
`blocks` is the kernel module's own frozen `Blocks` record of tunable block sizes (None: the backend's defaults).
Each runs under a `jax.named_scope` of its name. Kernel modules import jax and `zipjax.kernels.common` only, so
each imports alone (with `zipjax/__init__.py` lazy, nothing else of zipjax loads).
"""
