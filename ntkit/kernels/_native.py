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
process; a refusal is remembered in the cache once the portable build has shown that the flags were the
cause). A read-only cache directory is read, and new libraries are then built in a temporary directory for
the process. If compilation fails altogether (no compiler), :func:`load` warns once and returns None and the
caller uses its torch path. ``NTKIT_NO_COMPILE=1`` switches native loops
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


def _compile(cc: list[str], flags: list[str], source: Path, path: Path) -> str | None:
    """Compile ``source`` into ``path`` (atomically: concurrent processes never load a half-written library);
    None on success, else what went wrong."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        try:
            run = subprocess.run([*cc, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                                 timeout=300)
        except subprocess.TimeoutExpired:
            return "the compiler ran for more than 300 s"
        if run.returncode != 0:
            return (run.stderr or run.stdout).strip() or f"exit status {run.returncode}"
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.exists():  # (another process may hold an identical one open)
                raise
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def _build(name: str) -> ctypes.CDLL:
    source = _HERE / f"_{name}.c"
    text = source.read_bytes()
    cc = _compiler()
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    cpu = _cpu_flags()
    cache = cache_dir()
    # a read-only cache: libraries already there are used, new ones are built for this process only
    build_dir = cache if _writable(cache) else Path(tempfile.mkdtemp(prefix="ntkit-native-"))
    failed = []  # (flags, marker, message) of tuned flags that did not build
    for flags in ((_tuned(), _PORTABLE) if cpu else (_PORTABLE,)):
        key = hashlib.sha256(b"\0".join([text, " ".join(flags).encode(), version.encode(),
                                         platform.machine().encode(), cpu.encode()])).hexdigest()[:20]
        path = cache / f"{name}-{key}.so"
        if not path.exists():
            path = build_dir / path.name
        marker = path.with_suffix(".failed")  # tuned flags refused here before (where portable ones build)
        if marker.exists():
            failed.append((flags, marker, marker.read_text()))
            continue
        if not path.exists():
            problem = _compile(cc, flags, source, path)
            if problem is not None:
                failed.append((flags, marker, problem))
                continue
        for _, mark, problem in failed:  # the flags themselves were the cause: do not retry in every process
            if not mark.exists():
                try:
                    mark.write_text(problem)
                except OSError:
                    pass
        if failed:
            warnings.warn(f"ntkit: the native {name} loops were built without CPU-specific flags (slower): "
                          f"{failed[0][2].strip()[:300]}", RuntimeWarning, stacklevel=4)
        return ctypes.CDLL(str(path))
    raise RuntimeError("; ".join(f"{' '.join(cc)} {' '.join(flags)}: {problem.strip()[:300]}"
                                 for flags, _, problem in failed))


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
