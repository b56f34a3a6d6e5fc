"""A pure-torch stand-in for `sgl_kernel` on machines without a GPU (there is no CPU build of it on PyPI).

It provides only the CPU bookkeeping ops that SGLang 0.5.23 imports and calls on CPU in its speculative-decoding paths,
module by module as the real package lays them out, and the sampling ops its EAGLE-family verify needs to sample on
CPU instead of silently decoding greedily (bound into SGLang by `flexdraft_sgl.patches.eagle_cpu_sampling`). It
registers nothing under `torch.ops.sgl_kernel`, so SGLang sees no Intel AMX kernels and runs every layer's
`forward_native`. Installed by `flexdraft_sgl.sglang.cpu.install()`, which never lets it shadow a real `sgl_kernel`.
"""

from .kvcacheio import copy_all_layer_kv_cache_cpu
from .sampling import top_k_renorm_prob, top_p_renorm_prob
from .speculative import (
    assign_draft_cache_locs_contiguous_cpu,
    assign_extend_cache_locs_cpu,
    assign_req_to_token_pool_cpu,
    build_tree_kernel_efficient_cpu,
    fill_accept_out_cache_loc_cpu,
    fill_bonus_tokens_cpu,
    reconstruct_indices_from_tree_mask,
    rotate_input_ids_cpu,
    tree_speculative_sampling_target_only,
    verify_tree_greedy_cpu,
)

__all__ = [
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "assign_req_to_token_pool_cpu",
    "build_tree_kernel_efficient_cpu",
    "copy_all_layer_kv_cache_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "reconstruct_indices_from_tree_mask",
    "rotate_input_ids_cpu",
    "top_k_renorm_prob",
    "top_p_renorm_prob",
    "tree_speculative_sampling_target_only",
    "verify_tree_greedy_cpu",
]
