"""`ECHO` as an SGLang speculative algorithm: SGLang's STANDALONE machinery (separate draft model, EAGLE-style
multi-step drafting, dense tree verify), with the tree chosen by an echosim.spec policy (worker.py)."""

from __future__ import annotations

from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.srt.speculative.spec_registry import CustomSpecAlgo

NAME = "ECHO"


class EchoSpecAlgo(CustomSpecAlgo):
    """Duck-types STANDALONE everywhere SGLang branches on the algorithm (draft model loading, KV reserve, no draft
    hidden states); only the worker differs."""

    def is_standalone(self) -> bool:
        return True

    # enum-only methods SGLang still calls on a custom algorithm
    def carries_draft_hidden_states(self) -> bool:
        return False

    def need_topk(self) -> bool:
        return True

    def handle_server_args(self, server_args) -> None:
        SpeculativeAlgorithm.STANDALONE.handle_server_args(server_args)

    def create_future_map(self, *args, **kwargs):
        return SpeculativeAlgorithm.STANDALONE.create_future_map(*args, **kwargs)


def _factory(server_args):
    from echo_sglang_plugin.worker import EchoWorker
    return EchoWorker


def register() -> None:
    from sglang.srt.speculative.spec_registry import get_spec
    if get_spec(NAME) is None:
        SpeculativeAlgorithm.register(NAME, supports_overlap=False, spec_class=EchoSpecAlgo)(_factory)
