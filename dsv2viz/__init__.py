"""dsv2viz: look inside DeepSeek-V2-Lite: its latent attention, its experts and their router.

model = dsv2viz.load("/path/to/DeepSeek-V2-Lite")
logits, acts = model.run_with_cache(ids, names_filter="*.mlp.gate.hook_topk_idx")
trace = model.generate("def fibonacci(n):", 40).run()
dsv2viz.report(trace, "trace.html")
"""

from .checkpoint import CheckpointError
from .config import DEEPSEEK_V2_LITE, ConfigError, DeepseekV2Config
from .generation import Generation, Sampling, Step
from .hooks import ActivationCache, HookError, HookPoint
from .kv_cache import LatentKVCache
from .loading import DeviceError, load
from .model import DeepseekV2ForCausalLM, NonFiniteError
from .tokenizer import Tokenizer, TokenizerError
from .traces import Recording, Trace, TraceBudgetError, TraceError

__all__ = [
    "DEEPSEEK_V2_LITE",
    "ActivationCache",
    "CheckpointError",
    "ConfigError",
    "DeepseekV2Config",
    "DeepseekV2ForCausalLM",
    "DeviceError",
    "Generation",
    "HookError",
    "HookPoint",
    "LatentKVCache",
    "NonFiniteError",
    "Recording",
    "Sampling",
    "Step",
    "Tokenizer",
    "TokenizerError",
    "Trace",
    "TraceBudgetError",
    "TraceError",
    "load",
    "report",
]


def __getattr__(name: str):
    """`dsv2viz.report` imports plotly and the analyses on first use, so `import dsv2viz` stays light."""
    if name == "report":
        from .html_report import report

        return report
    raise AttributeError(f"module 'dsv2viz' has no attribute {name!r}")
