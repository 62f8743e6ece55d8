"""What the kernels' plans assume of the machine: the cache sizes, and the
``BNKERNELS_*`` environment variables that override them.

The kernel module reads :func:`l3_bytes` once, when it loads; its plans depend on
that size, the shape and the dtype, never on the thread count.
"""

import ctypes
import os
import sys
import warnings

# anything larger is not a cache size (and would not fit Py_ssize_t)
MAX_CACHE_BYTES = 1 << 62

SYSFS_CACHE = "/sys/devices/system/cpu/cpu0/cache"

# glibc's sysconf names of the level-2 and level-3 data cache sizes
_SC_CACHE_SIZE = {2: 191, 3: 194}


def sysfs_size(text):
    """Bytes of a sysfs cache size such as '512K' or '8192K'; None if it is not one."""
    text = text.strip()
    unit = 1
    for suffix, bytes_ in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if text.endswith(suffix):
            unit = bytes_
            text = text[: len(text) - 1]
    if not text.isdigit():
        return None
    value = int(text) * unit
    return value if 0 < value <= MAX_CACHE_BYTES else None


def _libc_cache_bytes(level):
    """The C library's answer (glibc's sysconf); 0 if it has none."""
    try:
        libc = ctypes.CDLL(None)
        libc.sysconf.restype = ctypes.c_long
        value = libc.sysconf(_SC_CACHE_SIZE[level])
    except (OSError, AttributeError):
        return 0
    return value if 0 < value <= MAX_CACHE_BYTES else 0


def cache_bytes(level, base=SYSFS_CACHE):
    """Bytes of the level-2 or level-3 cache one core sees; 0 if unknown.

    Linux's sysfs (``base``) gives the share of a core's group (the C library may report a
    whole package's L3); where sysfs can be read it alone decides, entries it cannot parse
    being skipped.  The C library is asked only where there is no sysfs."""
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return _libc_cache_bytes(level)
    for name in names:
        if not name.startswith("index"):
            continue
        try:
            with open(os.path.join(base, name, "level")) as f:
                lv = int(f.read())
            with open(os.path.join(base, name, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(base, name, "size")) as f:
                size = sysfs_size(f.read())
        except (OSError, ValueError):
            continue
        if lv == level and kind in ("Data", "Unified") and size is not None:
            return size
    return 0


def _outside_stacklevel():
    """The ``stacklevel`` that makes a warning issued by this function's caller point at the
    first frame outside bnkernels and importlib: the user's import, not the machinery that
    loads the kernel module.  Counted as :mod:`warnings` counts, which skips importlib's
    bootstrap frames."""
    package = os.path.dirname(__file__) + os.sep

    def bootstrap(frame):
        name = frame.f_code.co_filename
        return "importlib" in name and "_bootstrap" in name

    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(package) or "importlib" in name):
            return level
        frame = frame.f_back
        while frame is not None and bootstrap(frame):
            frame = frame.f_back
        level += 1
    return 2


def l3_bytes():
    """The L3 size the plans assume: ``BNKERNELS_L3_BYTES`` if set (to pin the plans, and
    so the bits, across machines), else what :func:`cache_bytes` finds."""
    text = os.environ.get("BNKERNELS_L3_BYTES", "").strip()
    if text:
        value = int(text) if text.isdigit() else -1
        if 0 <= value <= MAX_CACHE_BYTES:
            return value
        warnings.warn(
            "BNKERNELS_L3_BYTES=%r is not a byte count from 0 to 2**62; ignored" % text,
            RuntimeWarning,
            stacklevel=_outside_stacklevel(),
        )
    return cache_bytes(3)
