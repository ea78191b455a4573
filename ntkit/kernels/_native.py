"""Native CPU loops: C sources shipped with ntkit, compiled on first use with the system C compiler.

Some kernel computations are a long chain of small steps whose intermediate results should never leave the
CPU's cache, which neither eager torch nor ``torch.compile`` can arrange (see :mod:`ntkit.kernels._conv_gap`:
the CNTK with global average pooling fuses all layers in a wavefront over rows). Those few loops are written in
plain C99 (``ntkit/kernels/_<name>.c``, no dependencies), compiled once per machine into a shared library in
the cache directory (``$NTKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ntkit``, else ``~/.cache/ntkit``) and called
through :mod:`ctypes`, which releases the GIL, so the caller can run several in threads.

The compiler is ``$CC`` (a command, possibly with arguments) or the first of ``cc``, ``gcc``, ``clang`` on the
path (``torch.compile`` needs one too). The flags keep IEEE arithmetic in the written order
(``-ffp-contract=off``, no fast-math), so results do not depend on the machine beyond rounding-free choices
such as the vector width. Where the CPU's feature flags can be read (Linux), ``-march=native`` tunes for this
CPU and the library's file name carries a hash of the source, the flags, the compiler's version and those
feature flags, so a cache shared between machines never loads a library built for another CPU; elsewhere only
portable flags are used. If the tuned flags are refused, the portable ones are used (with a warning, once per
process; the refusal is remembered in the cache). If compilation fails altogether (no compiler), :func:`load`
warns once and returns None and the caller uses its torch path. ``NTKIT_NO_COMPILE=1`` switches native loops
off, as it does ``torch.compile``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

__all__ = ["compiling_allowed", "load", "cache_dir"]

_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | None] = {}


def compiling_allowed() -> bool:
    """False when ``NTKIT_NO_COMPILE`` is set (to anything but ``0``): no native loops, no ``torch.compile``."""
    return os.environ.get("NTKIT_NO_COMPILE", "0") in ("", "0")


def cache_dir() -> Path:
    """Where compiled libraries are kept: ``$NTKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ntkit``, else
    ``~/.cache/ntkit``."""
    if os.environ.get("NTKIT_CACHE_DIR"):
        return Path(os.environ["NTKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ntkit"


def _compiler() -> list[str]:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])  # e.g. "ccache gcc"
    cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc or clang, or set CC)")
    return [cc]


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), what ``-march=native`` depends on; empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


_PORTABLE = ["-O3", "-std=c99", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off"]


def _tuned() -> list[str]:
    # -fno-thread-jumps: otherwise gcc duplicates the arc-cosine's two branches and their polynomial (1.5x slower)
    flags = ["-march=native", "-fno-thread-jumps"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mprefer-vector-width=512")  # 512-bit vectors where the CPU has them (8 float64 lanes)
    return flags + _PORTABLE


def _build(name: str) -> ctypes.CDLL:
    source = _HERE / f"_{name}.c"
    text = source.read_bytes()
    cc = _compiler()
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    cpu = _cpu_flags()
    errors = []
    for flags in ((_tuned(), _PORTABLE) if cpu else (_PORTABLE,)):
        key = hashlib.sha256(b"\0".join([text, " ".join(flags).encode(), version.encode(), platform.machine().encode(),
                                         cpu.encode()])).hexdigest()[:20]
        path = cache_dir() / f"{name}-{key}.so"
        refused = path.with_suffix(".failed")  # these flags failed here before: do not retry in every process
        if not path.exists() and not refused.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            try:
                run = subprocess.run([*cc, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                                     timeout=300)
                if run.returncode == 0:
                    try:
                        os.replace(tmp, path)  # atomic: concurrent processes never load a half-written library
                    except OSError:
                        if not path.exists():  # (another process may hold an identical one open)
                            raise
                else:
                    out = (run.stderr or run.stdout).strip()
                    if flags is _PORTABLE:  # a failed portable build is retried by the next process
                        errors.append(f"{' '.join(cc)} {' '.join(flags)}: {out[:300]}")
                        continue
                    refused.write_text(out)  # refused tuned flags are remembered
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        if path.exists():
            if errors:
                warnings.warn(f"ntkit: the native {name} loops were built without CPU-specific flags (slower): "
                              f"{errors[0]}", RuntimeWarning, stacklevel=4)
            return ctypes.CDLL(str(path))
        detail = refused.read_text().strip() if refused.exists() else ""
        errors.append(f"{' '.join(cc)} {' '.join(flags)}: {detail[:300]}")
    raise RuntimeError("; ".join(errors))


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library of ``ntkit/kernels/_<name>.c`` (built on first use, then loaded from the cache), or
    None when native loops are switched off or cannot be built (then it warns once per process)."""
    if not compiling_allowed():
        return None
    with _lock:
        if name not in _libs:
            try:
                _libs[name] = _build(name)
            except Exception as err:  # no compiler, a read-only cache, ...: the caller's torch path gives the same
                _libs[name] = None
                warnings.warn(f"ntkit: building the native {name} loops failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:300] if str(err) else ''}); using torch",
                              RuntimeWarning, stacklevel=3)
        return _libs[name]
