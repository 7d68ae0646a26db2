"""echo's SGLang plugin (entry point `echo` in group `sglang.srt.plugins`; SGLang runs `load` in each of its
processes before it resolves its server arguments).

- Keeps SGLang's `intel_amx` attention backend on a CPU without AMX (SGLang would rewrite it to torch_native, which
  has no speculative draft backend): an AROUND hook through SGLang's HookRegistry on the post-process pass that does
  the rewrite. The kernels it then calls are echo's torch sgl_kernel (echo_exec/sglang_cpu/sgl_kernel).
- Registers the speculative algorithm `ECHO` (SpeculativeAlgorithm.register): SGLang's STANDALONE worker with a
  separate draft model, whose tree is chosen by a policy object of echosim.spec (worker.py).
  The policy: `--speculative-echo-policy NAME` (any of echosim.spec.policies, default echo) and
  `--speculative-echo-config FILE_OR_JSON`, or the same through ECHO_SGLANG_POLICY / ECHO_SGLANG_POLICY_CONFIG;
  with no config, `policy-NAME.json` of the draft model directory is used when present (as `echosim serve` does).
  An online-adaptive config (the shipped policy-echo.json) runs adaptive: the worker hands the policy each step's
  verify result and measured times.
- Reports the policy in SGLang's `/server_info` (each scheduler's `internal_states` entry gains `echo_policy`: its
  name, settings and live state, e.g. the adaptive budget's estimates): an AFTER-style hook on the internal-state
  readback's speculative part.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

FALLBACKS = "sglang.srt.arg_groups.overrides._attention_backend_platform_fallbacks"
AMX_EXTEND_METADATA = "sglang.srt.layers.attention.intel_amx_backend.IntelAMXAttnBackend._build_extend_metadata"
SPEC_STATE = "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController._add_speculative"
POLICY_ENV, CONFIG_ENV = "ECHO_SGLANG_POLICY", "ECHO_SGLANG_POLICY_CONFIG"


def keep_intel_amx(original, view, *args, **kwargs):
    """SGLang's fallback pass, except that intel_amx on a CPU stays intel_amx (ECHO_SGLANG_KEEP_AMX=0: SGLang's)."""
    if (getattr(view, "attention_backend", None) == "intel_amx" and getattr(view, "device", None) == "cpu"
            and os.environ.get("ECHO_SGLANG_KEEP_AMX", "1") != "0"):
        return {}
    return original(view, *args, **kwargs)


def add_echo_args(original, parser, *args, **kwargs):
    out = original(parser, *args, **kwargs)
    parser.add_argument("--speculative-echo-policy", default=None,
                        help="echo policy deciding ECHO's trees (echosim.spec.policies name; default echo)")
    parser.add_argument("--speculative-echo-config", default=None,
                        help="the policy's settings: a JSON file or an inline JSON object")
    return out


def stash_echo_args(original, cls, args, *a, **kw):
    """ServerArgs has no field for the plugin's flags: hand them to every SGLang process through the environment
    (its scheduler processes start after the arguments are parsed and inherit it)."""
    if getattr(args, "speculative_echo_policy", None):
        os.environ[POLICY_ENV] = args.speculative_echo_policy
    if getattr(args, "speculative_echo_config", None):
        os.environ[CONFIG_ENV] = args.speculative_echo_config
    return original(cls, args, *a, **kw)


def load() -> None:
    from sglang.srt.arg_groups import overrides
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(FALLBACKS, keep_intel_amx, HookType.AROUND)
    # The pass list holds the function object itself: point its entry at the module attribute, which the hook wraps.
    passes = overrides.POST_PROCESS_PASSES
    for i, fn in enumerate(passes):
        if getattr(fn, "__name__", "") == "_attention_backend_platform_fallbacks":
            def through_module(view, *args, **kwargs):
                return overrides._attention_backend_platform_fallbacks(view, *args, **kwargs)
            through_module.__name__ = fn.__name__
            passes[i] = through_module
    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", add_echo_args, HookType.AROUND)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", stash_echo_args, HookType.AROUND)
    HookRegistry.register(AMX_EXTEND_METADATA, ragged_extend_metadata_hook, HookType.AROUND)
    HookRegistry.register(SPEC_STATE, add_policy_state, HookType.AROUND)
    from echo_sglang_plugin.algorithm import register
    register()


def ragged_extend_metadata_hook(original, backend, forward_batch, *args, **kwargs):
    from echo_sglang_plugin.worker import ragged_extend_metadata
    return ragged_extend_metadata(original, backend, forward_batch, *args, **kwargs)


def add_policy_state(original, controller, state, *args, **kwargs):
    """SGLang's speculative readback, plus the ECHO worker's policy: {name, settings, state} as plain JSON."""
    out = original(controller, state, *args, **kwargs)
    worker = getattr(controller.scheduler, "draft_worker", None)
    policy = getattr(getattr(worker, "_draft_worker", None), "policy", None)
    if policy is not None:
        import json
        state["echo_policy"] = json.loads(json.dumps(
            {"name": policy.name, "settings": policy.describe(), "state": policy.state()}, default=float))
    return out
