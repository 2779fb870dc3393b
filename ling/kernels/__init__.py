"""Fast paths for the reference model (`ling/model.py`), chosen by measurement, applied from outside.

Each module is one concept — a faster way to compute one part of the model on some device
— with a test that it computes what the reference computes, in value and gradient:

- `cpu_attention`: attention as batched matmuls (training, prefill) and for one query per
  row (decoding), where SDPA's CPU kernels are slow;
- `grad_ops`: bias and embedding gradients kept as ATen ops in a compiled CPU step;
- `gelu`: GPT-2's GELU as one fused loop for training;
- `prepack`: linear weights in oneDNN's blocked layout for decoding;
- `lean_block`: a transformer layer for inference in fewer operations (fused epilogues);
- `cuda_attention`: SDPA's backend pinned on CUDA;
- `compile_decision`: whether compiling the decode step pays for a request.

The trainer calls `plan_training_kernels` then `apply_training_kernels`, the inference engine
`plan_inference_kernels` then `apply_inference_kernels`; the plans time the candidates on the model's real shapes on the machine at hand (`probe`, cached
per chip, thread count, torch version and shape) and return a `KernelReport` that commands
print in their summary, write to metrics.jsonl and the server shows at /health. With
`--kernels reference` nothing is swapped and the plain model runs.

Adding a kernel: a subclass of the model module it speeds up that overrides one method (or
a module that replaces it), a test against the reference, and a candidate in `training.py`
or `inference.py` so that a measurement decides when it runs.
"""

from ling.kernels import compile_decision
from ling.kernels.inference import apply_inference_kernels, plan_inference_kernels
from ling.kernels.probe import Probe
from ling.kernels.report import MODES, Choice, KernelReport, check_mode
from ling.kernels.training import apply_training_kernels, plan_training_kernels

__all__ = ["MODES", "Choice", "KernelReport", "Probe", "apply_inference_kernels", "apply_training_kernels",
           "check_mode", "compile_decision", "plan_inference_kernels", "plan_training_kernels"]
