# Type stub for the compiled module bnkernels/_kernels.pyx.
#
# The comments give the Cython types: "floating" arrays are float16, float32 or float64 (one
# dtype per call), "float64[C]" arrays are contiguous per-channel vectors, strides are in
# elements, and `n_threads <= 0` means the OpenMP default (omp_get_max_threads at call time).
# The kernels trust their caller (bnkernels._api): shapes, strides and dtypes are not re-checked.

import numpy as np

CHANNEL_BLOCK_BYTES: int  # narrowest channel block of a fused rows task, bytes
TASK_INPUT_BYTES: int  # input bytes one task aims for (its data stays in L2)
WIDE_BLOCK_BYTES: int  # channel block of a chunked rows task: full rows up to this, bytes
PARALLEL_MIN_ELEMS: int  # elements from which a call may use several threads
# the L3 size the plans assume: BNKERNELS_L3_BYTES, else sysfs, else sysconf; 0: unknown
L3_BYTES: int
# float64 outputs of at least this many bytes are written with streaming stores:
# STREAM_CAP_BYTES (16 MiB), or L3_BYTES where that is known and smaller; the results are the
# same either way
STREAM_CAP_BYTES: int
STREAM_OUTPUT_BYTES: int

def openmp_enabled() -> bool: ...
def max_threads() -> int: ...  # omp_get_max_threads(); 1 for a serial build
def cache_bytes() -> tuple[int, int]: ...  # (L2, L3) bytes one core sees; 0: unknown
def build_flags() -> str: ...
def simd_targets() -> str: ...

F16_CODES: tuple[str, ...]

def float16_code(kind: str | None = ...) -> str: ...
def rows_plan(
    R: int,  # Py_ssize_t, rows of the (R, C*L) view
    C: int,  # Py_ssize_t
    itemsize: int,  # Py_ssize_t, 4 or 8
    n_arrays: int,  # Py_ssize_t, arrays a task streams
    L: int = ...,  # Py_ssize_t, contiguous elements per channel in a row; 1
) -> tuple[int, int, int, int]: ...  # (channels_per_block, n_blocks, rows_per_chunk, n_chunks)
def planar_plan(
    N: int,  # Py_ssize_t
    C: int,  # Py_ssize_t
    L: int,  # Py_ssize_t, contiguous run of one (n, c) plane
    itemsize: int,  # Py_ssize_t, 4 or 8
    n_arrays: int,  # Py_ssize_t
) -> tuple[int, int, int, int]: ...  # (channels_per_block, n_blocks, elements_per_chunk, n_chunks)

# lay: bnkernels._layout.choose(arrays, axis) over the call's arrays in the order
# (x or z, dy, out), the absent ones left out: ("rows", R, C, L, [row stride, ...]) or
# ("planar", N, C, L, [(sn, sc), ...]), strides in elements

def backward(
    lay: tuple[str, int, int, int, list],  # tuple, over [z, dy, y, dx, dres] (absent ones left out)
    z: np.ndarray,  # const floating: x, or xhat when xhat_form
    dy: np.ndarray,  # const floating, dtype of z
    dx: np.ndarray,  # floating, dtype of z; written
    mean: np.ndarray,  # const float64[C]; zeros when xhat_form
    scale: np.ndarray,  # const float64[C]; invstd, or denom when xhat_form
    gamma: np.ndarray,  # const float64[C] or float32[C]
    var: np.ndarray,  # const float64[C]; read when std_mode
    xhat_form: bool,  # bint
    std_mode: bool,  # bint
    train: bool,  # bint
    dgamma: np.ndarray,  # floating[C], the parameters' dtype; written
    dbeta: np.ndarray,  # floating[C], as dgamma; written
    n_threads: int,  # int
    y: np.ndarray | None = ...,  # const, dtype of z: a fused ReLU's output, masks dy
    dres: np.ndarray | None = ...,  # dtype of z; written: the masked dy
) -> None: ...
def backward_reduce(
    lay: tuple[str, int, int, int, list],  # tuple, over [z, dy, y]
    z: np.ndarray,  # const floating
    dy: np.ndarray,  # const floating, dtype of z
    mean: np.ndarray,  # const float64[C]
    sum_dy: np.ndarray,  # float64[C]; written
    sum_dy_zm: np.ndarray,  # float64[C]; written
    n_threads: int,  # int
    y: np.ndarray | None = ...,  # const, dtype of z: a fused ReLU's output, masks dy
) -> None: ...
def backward_apply(
    lay: tuple[str, int, int, int, list],  # tuple, over [z, dy, y, dx, dres]
    z: np.ndarray,  # const floating
    dy: np.ndarray,  # const floating, dtype of z
    dx: np.ndarray,  # floating, dtype of z; written
    mean: np.ndarray,  # const float64[C]
    scale: np.ndarray,  # const float64[C]
    gamma: np.ndarray,  # const float64[C] or float32[C]
    var: np.ndarray,  # const float64[C]
    xhat_form: bool,  # bint
    std_mode: bool,  # bint
    train: bool,  # bint
    sum_dy: np.ndarray,  # const float64[C], over the whole batch
    sum_dy_zm: np.ndarray,  # const float64[C], over the whole batch
    count: int,  # Py_ssize_t, elements per channel of the whole batch
    dgamma: np.ndarray,  # floating[C], the parameters' dtype; written
    dbeta: np.ndarray,  # floating[C], as dgamma; written
    n_threads: int,  # int
    y: np.ndarray | None = ...,  # as for backward
    dres: np.ndarray | None = ...,  # as for backward
) -> None: ...
def forward(
    lay: tuple[str, int, int, int, list],  # tuple, over [x, residual, out]
    x: np.ndarray,  # const floating
    out: np.ndarray,  # floating, dtype of x; written
    train: bool,  # bint
    eps: float,  # double
    std_mode: bool,  # bint
    gamma: np.ndarray,  # const float64[C]
    beta: np.ndarray,  # const float64[C]
    mean: np.ndarray,  # float64[C]; written in train mode, else read
    var: np.ndarray,  # float64[C]; written in train mode, else read
    invstd: np.ndarray,  # float64[C]; written in train mode, else read
    n_threads: int,  # int
    residual: np.ndarray | None = ...,  # const, dtype of x: added before the activation
    relu: bool = ...,  # bint: out = max(out, 0)
) -> bool: ...  # whether a variance is not finite
def batch_stats(
    lay: tuple[str, int, int, int, list],  # tuple, over [x]
    x: np.ndarray,  # const floating
    mean: np.ndarray,  # float64[C]; written
    m2: np.ndarray,  # float64[C]; written: sum of squared deviations from mean
    n_threads: int,  # int
) -> None: ...
def stream_add(
    a: np.ndarray,  # const floating, C-contiguous
    b: np.ndarray,  # const floating, C-contiguous, size and dtype of a
    out: np.ndarray,  # floating, C-contiguous, size and dtype of a; written
    n_threads: int = ...,  # int, 0: the OpenMP default
) -> None: ...
def any_between(
    v: np.ndarray,  # const float64[n], contiguous
    lo: float,  # double
    hi: float,  # double
) -> bool: ...
def running_update(
    running: np.ndarray,  # float32 or float64, C-contiguous
    stat: np.ndarray,  # float64, C-contiguous, size of running
    momentum: float,  # double
) -> np.ndarray | None: ...  # NumPy's momentum*running + (1-momentum)*stat; None: not finite
