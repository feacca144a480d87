"""taxiway: serve large language models. `from taxiway import LLM, SamplingParams`."""

from gpu_engine.llm import LLM
from gpu_engine.outputs import CompletionOutput, RequestOutput
from gpu_engine.sampling_params import OutputKind, SamplingParams

__all__ = ["LLM", "SamplingParams", "OutputKind", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
