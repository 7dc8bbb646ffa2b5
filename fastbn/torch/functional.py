"""``fastbn.torch.batch_norm``: torch.nn.functional.batch_norm on fastbn's kernels.

Routing (:func:`covered_by_kernels`): CPU tensors of at least KERNEL_MIN_ELEMENTS elements
(smaller ones run faster on torch's own kernel), of float32 or float64, with weight, bias and
running statistics of the input's dtype, run fastbn's kernels, and so do bfloat16 and float16
inputs with float32 weight, bias and running statistics (torch's mixed precision; bfloat16
needs ml_dtypes, the lowp extra, to reach the kernels). Everything else (CUDA and other
devices, the meta device, 16-bit parameters, other mixed dtypes) runs
``torch.nn.functional.batch_norm`` and gives exactly its result, and so do two kinds of float32
and float64 batch norm without a fused ReLU where torch's own kernel is as fast as fastbn's
(see TORCH_CHANNELS_LAST_MIN_CHANNELS and TORCH_RUNNING_STATS): channels-last tensors of many
channels, and normalization with the running statistics (eval mode). Fake tensors met while
``torch.compile`` traces count as CPU tensors and go through the custom ops' fake kernels.
"""

import torch
import torch.nn.functional as torch_functional

from . import ops
from .tensors import has_bfloat16_arrays, in_kernel_layout, kernel_layout

__all__ = ["batch_norm", "batch_norm_relu", "covered_by_kernels"]

KERNEL_DTYPES = (torch.float32, torch.float64)
# Below this many elements a call runs torch's own kernel, which is faster there: the bridge's
# Python (an autograd.Function, NumPy views, validation) costs about 50 us per forward +
# backward, while torch's whole module call on a (2, 4, 8, 8) tensor takes 32 us. Measured
# forward + backward, module calls, quiet machine, 2 threads (torch / fastbn time):
# (2,4,8,8) 0.40, (8,16,16,16) 0.60, (16,32,16,16) 1.09, (128,1024) 0.61 at 131,072 elements;
# (256,1024) 2.0, (1024,256) 1.45, (32,32,16,16) 8.9 at 262,144. Set it to 0 to run every
# size on the kernels.
KERNEL_MIN_ELEMENTS = 1 << 18
# 16-bit storage: the kernels read and write their bits (see tensors.as_array).
LOWP_DTYPES = (torch.bfloat16, torch.float16)
# Channels-last float32 and float64 batch norms of at least this many channels run torch's own
# kernel. torch's channels-last kernels are vectorized across channels and already move the
# bytes at the memory's speed; fastbn's make the same passes, and its float64 sums cost more
# arithmetic wherever the tensor is in the cache. Inside a ResNet-18-shaped model (batch 32,
# 112x112, 2 threads) fastbn's channels-last kernels alone took about as long as torch's whole
# forward or backward call, e.g. (32, 64, 28, 28) 442 us forward and 611 us backward against
# 520 and 500 us, so the bridge's Python around them made the converted step slower (medians
# of three interleaved rounds: 252.0 against 244.6 ms); routed to torch's kernel, 246.8 ms.
# Below 16 channels torch's loops leave its vectors part-empty and fastbn's lane groups win
# (8x3x224x224: 28-32x in python -m fastbn --bridge). A ReLU fused into the kernels (BNReLU
# modules) saves the ReLU's own pass and stays on fastbn. Set this to None to run every
# channels-last tensor on fastbn's kernels, whose statistics are float64 and do not depend on
# the thread count.
TORCH_CHANNELS_LAST_MIN_CHANNELS = 16
# Float32 and float64 normalization with the running statistics (eval mode, without a fused
# ReLU) runs torch's own kernel when this is True. It is one streaming pass, which torch's
# kernel makes at about the memory's speed (fastbn's kernel alone is 1.0-1.35x faster, see
# python -m fastbn), so the bridge's Python around fastbn's only made it slower: in the
# ResNet-18-shaped model's inference (channels-first, 20 batch norms), fastbn's batch-norm
# calls took 4.7-6.9 ms per forward against torch's 3.0-3.3 ms, slower on every layer shape.
TORCH_RUNNING_STATS = True


def covered_by_kernels(input, *tensors, relu=False, training=True):
    """True when fastbn's kernels compute batch norm of ``input`` with these weight, bias and
    running tensors (None entries are ignored); ``relu``: with a ReLU fused (BNReLU);
    ``training``: with the batch's statistics, False with the running ones."""
    if input.device.type != "cpu" or input.dim() < 2 or input.numel() < KERNEL_MIN_ELEMENTS:
        return False
    if input.dtype in KERNEL_DTYPES:
        if not relu and ((not training and TORCH_RUNNING_STATS)
                         or (TORCH_CHANNELS_LAST_MIN_CHANNELS is not None
                             and input.shape[1] >= TORCH_CHANNELS_LAST_MIN_CHANNELS
                             and kernel_layout(input) is True)):
            return False
        param_dtype = input.dtype
    elif input.dtype in LOWP_DTYPES and (input.dtype == torch.float16 or has_bfloat16_arrays()):
        param_dtype = torch.float32
    else:
        return False
    n_channels = input.shape[1]
    for t in tensors:
        # A length that does not match the channels is torch's error to raise, in its words.
        if t is not None and (t.dtype != param_dtype or t.device.type != "cpu"
                              or t.shape != (n_channels,)):
            return False
    return True


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Mirror of ``torch.nn.functional.batch_norm``: same arguments, same result, same
    in-place update of ``running_mean`` and ``running_var`` in training."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       relu=False)


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5):
    """``torch.relu(torch.nn.functional.batch_norm(...))`` with the ReLU fused into the
    kernels' normalize pass, and a backward that recomputes its mask (no extra tensor)."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       relu=True)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu):
    if not covered_by_kernels(input, running_mean, running_var, weight, bias, relu=relu,
                              training=training):
        y = torch_functional.batch_norm(input, running_mean, running_var, weight, bias,
                                        training, momentum, eps)
        return torch.relu(y) if relu else y
    # Copy odd striding here, as a traced op, rather than inside the custom op: inductor then
    # sees the copy, and the op's input and output strides are the plain ones it expects.
    input, _ = in_kernel_layout(input)
    if training:
        # torch's own check and message for one value per channel.
        torch_functional._verify_batch_size(input.size())
        if not torch.compiler.is_compiling():
            return ops.TrainFunction.apply(input, weight, bias, running_mean, running_var,
                                           momentum, eps, relu)[0]
        # The registered op mutates nothing, so that torch.compile can trace it; the buffers
        # take its new running statistics here, which the compiled graph keeps as a copy.
        y, _, _, new_mean, new_var = ops.batch_norm_train(input, weight, bias, running_mean,
                                                          running_var, momentum, eps, relu)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
        return y
    if running_mean is None or running_var is None:
        raise RuntimeError("running_mean and running_var must be defined in evaluation mode")
    evaluate = ops.batch_norm_eval if torch.compiler.is_compiling() else ops.EvalFunction.apply
    return evaluate(input, running_mean, running_var, weight, bias, eps, relu)
