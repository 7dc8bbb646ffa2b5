"""The NumPy reference, beside fastbn on the dashboard: the baseline of the speedups."""

from .common import PARAM_NAMES, PARAMS, NumpyBatchNorm, make_arrays


class NumpyReference:
    """Straightforward vectorized NumPy at the input dtype; it allocates its results, as
    NumPy code does."""

    params = PARAMS
    param_names = PARAM_NAMES

    def setup(self, shape, layout, dtype):
        if dtype == "bfloat16":
            # ml_dtypes computes bfloat16 element by element through Python-level casts; that
            # is no baseline anyone would write.
            raise NotImplementedError("NumPy has no bfloat16 arithmetic of its own")
        self.bn = NumpyBatchNorm(make_arrays(shape, layout, dtype), layout)

    def time_train_forward(self, shape, layout, dtype):
        self.bn.train_forward()

    def time_eval_forward(self, shape, layout, dtype):
        self.bn.eval_forward()

    def time_backward(self, shape, layout, dtype):
        self.bn.backward()
