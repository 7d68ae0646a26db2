"""sgl_kernel for SGLang's CPU speculative path, in plain torch (PyPI has no CPU build of sgl-kernel).

make_venv.sh puts the directory holding this package on the SGLang venv's path. With SGLang's `intel_amx` attention
backend kept on a CPU without AMX (the plugin in echo_exec/sglang_plugin does that), SGLang's speculative path calls
the eleven ops below; each is vectorized over the batch (no Python loop per request) and unit-tested against
SGLang's own Triton kernels run by Triton's interpreter, or against a brute-force definition where SGLang has none
(tests/test_sglang_kernels.py):

- attention (`torch.ops.sgl_kernel.*`, as the intel_amx backend calls them): extend_attention_cpu,
  decode_attention_cpu;
- trees: build_tree_kernel_efficient_cpu, verify_tree_greedy_cpu;
- KV bookkeeping: copy_all_layer_kv_cache_cpu, build_draft_decode_metadata_cpu, assign_req_to_token_pool_cpu,
  assign_draft_cache_locs_contiguous_cpu, assign_extend_cache_locs_cpu, fill_bonus_tokens_cpu,
  fill_accept_out_cache_loc_cpu.

Every other name SGLang's CPU modules import at load (AMX GEMMs, MoE, quantized kernels: paths not taken here)
still imports and refuses to run: calling one raises NotImplementedError naming it, so a run that would need it stops
loudly; with ECHO_SGL_STANDIN_LOG set, each such call's name is appended to that file (tests check a run made none).
"""

import os

from sgl_kernel._attention import decode_attention_cpu, extend_attention_cpu
from sgl_kernel._spec import (
    assign_draft_cache_locs_contiguous_cpu,
    assign_extend_cache_locs_cpu,
    assign_req_to_token_pool_cpu,
    build_draft_decode_metadata_cpu,
    build_tree_kernel_efficient_cpu,
    copy_all_layer_kv_cache_cpu,
    fill_accept_out_cache_loc_cpu,
    fill_bonus_tokens_cpu,
    verify_tree_greedy_cpu,
)

__version__ = "0.0.0+echo-torch-cpu"

__all__ = ["extend_attention_cpu", "decode_attention_cpu", "build_tree_kernel_efficient_cpu",
           "verify_tree_greedy_cpu", "copy_all_layer_kv_cache_cpu", "build_draft_decode_metadata_cpu",
           "assign_req_to_token_pool_cpu", "assign_draft_cache_locs_contiguous_cpu", "assign_extend_cache_locs_cpu",
           "fill_bonus_tokens_cpu", "fill_accept_out_cache_loc_cpu"]
IMPLEMENTED = tuple(__all__)


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        log = os.environ.get("ECHO_SGL_STANDIN_LOG")
        if log:  # a caller may catch the error and fall back: the log still shows the call
            with open(log, "a") as f:
                f.write(name + "\n")
        raise NotImplementedError(f"sgl_kernel.{name} is not available on this machine (echo's torch CPU kernels "
                                  f"implement only {', '.join(IMPLEMENTED)})")

    missing.__name__ = name
    return missing
