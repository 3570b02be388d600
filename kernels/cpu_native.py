"""Native CPU kernels (C++, XLA FFI) for the adder similarity and its backward rules.

The same three "pseudo-matmuls" as :mod:`kernels.adder_pallas`, with the same signatures and
semantics (``u = x * e``, the input after the stretch E, formed inside the kernel):

==================== ============================================== ================ ==========
kernel               out[p, q] = sum over r of                       out              reduction
==================== ============================================== ================ ==========
:func:`forward`      ``-|u[l, i] - w[i, d]|``                         (l, d)           i
:func:`x_grad`       ``g[l, d] * s(w[i, d] - u[l, i])``               (l, i)           d
:func:`w_grad_exact` ``g[l, d] * sign(u[l, i] - w[i, d])``            (i, d)           l
==================== ============================================== ================ ==========

and two integer kernels for int8 inference: :func:`sad` (``out[l, n] = sum_k |a[l, k] - b[k, n]|``
for uint8 codes, in int32; x86 PSADBW with AVX-512BW or AVX2, portable C++ elsewhere:
:func:`sad_path`) and :func:`adder_int8_layer`, the same sum inside a whole int8 adder layer.

The C++ source (``cpu_native.cc`` beside this file) is compiled on first use, not at import, with
the system compiler (``$CXX`` or ``g++``) and ``-O3 -march=native`` (plus ``$ADDERVIT_CXXFLAGS``):
the machine that runs it is the one that builds it. The library goes to a cache directory
(``$ADDERVIT_CACHE_DIR`` or ``~/.cache/addervit_jax``) under a name that hashes the source, the
compiler and its version, the flags, the CPU (model and feature flags, which ``-march=native``
depends on) and the JAX version, so an edit, an upgrade or another machine sharing the cache
rebuilds. A build writes a temporary file that is renamed into place, so concurrent processes
never load a half-written library, and records the library's sha256 beside it (``.sha256``),
checked before every load with the library's own ELF headers (every byte they point to must be
there, which a checksum recorded again after the damage does not show): a damaged library (cut
short, which would crash the loading process with SIGBUS) is rebuilt with a warning instead of
loaded. It is loaded with :mod:`ctypes` and its
handlers registered with :func:`jax.ffi.register_ffi_target` (the JAX FFI tutorial's route).

Without a compiler, or if the build fails, :func:`available` returns False after one warning and
keeps the reason in :data:`unavailable_reason`; the kernels then raise ``RuntimeError`` and the
caller (``ops``) uses the XLA backend.

Kernels compute in float32: bfloat16 (or other float) operands are cast to float32 in XLA before
the call, and :func:`forward` casts its result back to ``result_type(x, w)``. NaN and infinities
give what the jnp formulas give. Threads: each call spreads its jobs over XLA's intra-op thread
pool (one thread per core), or over at most ``$ADDERVIT_CPU_THREADS``; every output element is
summed in the same order whatever the thread count, so results do not depend on it. Under
:func:`jax.vmap` the batch folds into the rows (one call) when only ``x``/``g`` are batched, and
is mapped sequentially otherwise. The custom calls have no partitioning rule: under a sharded
``jit`` XLA gathers their operands onto every device, so callers that shard rows wrap them in
:func:`jax.shard_map` (as ``ops.shard_rows`` does for every kernel).

Speed (``python experiments/bench_ops.py --backend cpu_native``, 2-core Sapphire Rapids, L=4096,
384->1536, through ``ops.adder``): the forward about 2.4x a dense matmul, forward + backward 2.0x
(``"clipped"``) and 2.9x (``"exact"``). A term costs three AVX-512 instructions where a matmul
needs one fma.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shlex
import shutil
import struct
import subprocess
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "CXXFLAGS",
    "adder_int8_layer",
    "available",
    "build",
    "cache_dir",
    "forward",
    "int8_dense",
    "int8_matmul",
    "int8_matmul_path",
    "int8_matmul_reference",
    "onednn_flags",
    "sad",
    "sad_path",
    "sad_reference",
    "ternary_dense",
    "ternary_matmul",
    "unavailable_reason",
    "w_grad_exact",
    "x_grad",
]

SOURCE = pathlib.Path(__file__).with_name("cpu_native.cc")
CXXFLAGS = ("-O3", "-march=native", "-std=gnu++17", "-shared", "-fPIC", "-pthread")
# FFI target name -> exported C symbol of cpu_native.cc
_TARGETS = {
    "addervit_adder_forward": "AddervitForward",
    "addervit_adder_batched_forward": "AddervitBatchedForward",
    "addervit_adder_x_grad": "AddervitXGrad",
    "addervit_adder_w_grad_exact": "AddervitWGradExact",
    "addervit_sad_u8": "AddervitSadU8",
    "addervit_adder_int8_layer": "AddervitAdderInt8Layer",
    "addervit_int8_matmul": "AddervitInt8Matmul",
    "addervit_ternary_matmul": "AddervitTernaryMatmul",
    "addervit_int8_dense": "AddervitInt8Dense",
    "addervit_ternary_dense": "AddervitTernaryDense",
}
_X_GRAD_RULES = {"exact": 0, "addernet": 1, "clipped": 1}

# None until the first call of available() or of a kernel; then True, or False with the reason
# in unavailable_reason.
_available: bool | None = None
unavailable_reason: str | None = None
_lock = threading.Lock()
_library: ctypes.CDLL | None = None  # kept alive: XLA calls into it


def cache_dir() -> pathlib.Path:
    """Where built libraries go: ``$ADDERVIT_CACHE_DIR`` or ``~/.cache/addervit_jax``."""
    env = os.environ.get("ADDERVIT_CACHE_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "addervit_jax"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX") or "g++")


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU must not load on another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _installed_file(distribution: str, name: str) -> pathlib.Path | None:
    """The installed file of ``distribution`` whose path ends with ``name``, or None."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).replace("\\", "/").endswith(name):
            path = pathlib.Path(file.locate()).resolve()
            if path.is_file():
                return path
    return None


#: the /proc/cpuinfo flags under which oneDNN's int8 products are exact (VNNI's VPDPBUSD sums in
#: int32; AMX tiles likewise)
INT8_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def onednn_flags() -> tuple[list[str], list[str]]:
    """The compile and link flags of the int8 matmul's oneDNN (:func:`int8_matmul`): where the
    wheels ``onednn-cpu-gomp`` (``libdnnl.so.3``) and ``onednn-devel-cpu-gomp`` (its headers)
    are installed, which ``pyproject.toml`` asks for on x86-64 Linux, and the CPU has VNNI or
    AMX (:data:`INT8_PRODUCT_FLAGS`); ``([], [])`` elsewhere, or with
    ``$ADDERVIT_NO_ONEDNN=1`` (the int8 matmul then runs XLA's)."""
    if os.environ.get("ADDERVIT_NO_ONEDNN", "") not in ("", "0"):
        return [], []
    if not set(_cpu_signature().split()) & INT8_PRODUCT_FLAGS:
        # without VNNI or AMX oneDNN's int8 kernels sum pairs of products in int16 with
        # saturation (oneDNN's "Nuances of int8 computations"): not exact, so not used
        return [], []
    library = _installed_file("onednn-cpu-gomp", "libdnnl.so.3")
    header = _installed_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
    if library is None or header is None:
        return [], []
    include = header.parents[2]
    return (
        ["-DADDERVIT_ONEDNN=1", "-fopenmp", "-I", str(include)],
        [str(library), f"-Wl,-rpath,{library.parent}"],
    )


def build(onednn: bool = True) -> pathlib.Path:
    """Compile ``cpu_native.cc`` (or find it in the cache) and return the library's path: with
    oneDNN where :func:`onednn_flags` finds it (and ``onednn``); if that build fails, once more
    without it (a ``RuntimeWarning`` says why, once: the failure is remembered in the cache
    beside the library it would have been, as ``<name>.failed``: delete it to try again), so the
    adder kernels never depend on oneDNN.

    Raises ``RuntimeError`` naming the reason when there is no compiler or the build fails.
    """
    compile_flags, link_flags = onednn_flags() if onednn else ([], [])
    if not compile_flags:
        return _build([], [])
    failed = _target(compile_flags, link_flags).with_suffix(".failed")
    if failed.exists():
        return _build([], [])
    try:
        return _build(compile_flags, link_flags)
    except RuntimeError as err:
        library = _build([], [])  # where this fails too, its own reason is the one to give
        failed.write_text(str(err) + "\n")
        warnings.warn(
            f"cpu_native: building with oneDNN failed, so the int8 matmul runs XLA's: {err}",
            RuntimeWarning,
            stacklevel=2,
        )
        return library


def _flags(compile_flags: list[str]) -> list[str]:
    return [*CXXFLAGS, *shlex.split(os.environ.get("ADDERVIT_CXXFLAGS", "")), *compile_flags]


def _target(compile_flags: list[str], link_flags: list[str]) -> pathlib.Path:
    """The cached library's path: a name that hashes the source, the compiler and its version,
    the flags, the JAX version and the CPU. ``RuntimeError`` without a working compiler."""
    compiler = _compiler()
    if not compiler or shutil.which(compiler[0]) is None:
        raise RuntimeError(
            f"no C++ compiler: {compiler[0] if compiler else '$CXX'!r} not found (set CXX)"
        )
    try:
        version = subprocess.run(
            [*compiler, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"C++ compiler {compiler!r} does not run: {err}") from err
    key = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        " ".join(compiler).encode(),
        version.encode(),
        " ".join([*_flags(compile_flags), *link_flags]).encode(),
        jax.__version__.encode(),
        _cpu_signature().encode(),
    ):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"cpu_native-{key.hexdigest()[:20]}.so"


def _build(compile_flags: list[str], link_flags: list[str]) -> pathlib.Path:
    compiler, flags = _compiler(), _flags(compile_flags)
    target = _target(compile_flags, link_flags)
    digest_file = target.with_suffix(".sha256")
    if target.exists():
        damage = _damage(target, digest_file)
        if damage is None:
            return target
        # a cut-short or altered library would crash the process that loads it (SIGBUS): rebuild
        warnings.warn(f"{target} {damage}; rebuilding it", RuntimeWarning, stacklevel=2)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + "-", suffix=".tmp", dir=target.parent)
    os.close(fd)
    command = [*compiler, *flags, "-I", jax.ffi.include_dir(), str(SOURCE), *link_flags, "-o", tmp]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            # the compiler's errors first: its warnings can fill the tail of what it printed
            errors = "\n".join(ln for ln in out.stderr.splitlines() if "error" in ln)[:2000]
            detail = out.stderr[-2000:]
            if errors and errors not in detail:
                detail = f"{errors}\n...\n{detail}"
            raise RuntimeError(f"building {SOURCE.name} failed ({shlex.join(command)}):\n{detail}")
        # the checksum first, then the library, each atomically: a library without a matching
        # checksum is never loaded
        digest_tmp = f"{tmp}.sha256"
        pathlib.Path(digest_tmp).write_text(_file_digest(pathlib.Path(tmp)) + "\n")
        os.replace(digest_tmp, digest_file)
        os.replace(tmp, target)  # atomic: another process sees the old name or a whole library
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"building {SOURCE.name} failed: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _file_digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _damage(library: pathlib.Path, digest_file: pathlib.Path) -> str | None:
    """Why ``library`` must not be loaded, or None: its recorded checksum must match, and, since a
    checksum recorded again after the damage would match too, an ELF file must hold every byte
    its own headers point to (:func:`_elf_shortfall`)."""
    data = library.read_bytes()  # read once for both checks
    recorded = digest_file.read_text().strip() if digest_file.exists() else None
    if recorded != hashlib.sha256(data).hexdigest():
        return "does not match its recorded checksum (damaged or written by an older version)"
    shortfall = _elf_shortfall(data)
    if shortfall:
        return f"is cut short ({shortfall}) although its checksum matches"
    return None


def _elf_shortfall(data: bytes) -> str | None:
    """What an ELF shared library lacks of the bytes its headers point to, or None if it is whole
    or not ELF (another platform's format is not checked).

    The ELF header (at 0) gives the program header table (``e_phoff``, ``e_phentsize``,
    ``e_phnum``) and the section header table (``e_shoff`` ...), which linkers write last; each
    program header gives the file bytes of its segment (``p_offset + p_filesz``). Loading a file
    cut short of those maps pages past its end, and the first touch of one kills the process
    with SIGBUS.
    """
    if data[:4] != b"\x7fELF":
        return None
    if len(data) < 64 or data[4] not in (1, 2) or data[5] not in (1, 2):
        return f"{len(data)} bytes, not even a whole ELF header"
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    header = struct.Struct(order + ("QQQIHHHHHH" if wide else "IIIIHHHHHH"))
    _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _ = header.unpack_from(data, 24)
    ends = {
        "section headers": shoff + shentsize * shnum,
        "program headers": phoff + phentsize * phnum,
    }
    if ends["program headers"] <= len(data):
        for i in range(phnum):
            at = phoff + i * phentsize
            if wide:  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz
                offset, filesz = struct.unpack_from(order + "QQQQ", data, at + 8)[0::3]
            else:  # p_type, p_offset, p_vaddr, p_paddr, p_filesz
                offset, filesz = struct.unpack_from(order + "IIII", data, at + 4)[0::3]
            ends[f"segment {i}"] = offset + filesz
    needed, what = max((end, what) for what, end in ends.items())
    if needed > len(data):
        return f"{len(data)} of the {needed} bytes its {what} end at"
    return None


def available() -> bool:
    """Whether the native kernels can run here, building them on the first call.

    False (after one ``RuntimeWarning``; the reason in :data:`unavailable_reason`) when there is
    no C++ compiler or the build fails. The kernels are registered for the ``"cpu"`` platform
    only: a caller on another backend should not choose them.
    """
    global _available, unavailable_reason, _library
    if _available is not None:
        return _available
    with _lock:
        if _available is not None:
            return _available
        try:
            try:
                library = ctypes.CDLL(str(build()))
            except OSError as err:  # e.g. oneDNN's runtime missing: the kernels without it
                if not onednn_flags()[0]:
                    raise
                warnings.warn(
                    f"cpu_native: the library built with oneDNN does not load ({err}); "
                    "building it without oneDNN, so the int8 matmul runs XLA's",
                    RuntimeWarning,
                    stacklevel=2,
                )
                library = ctypes.CDLL(str(build(onednn=False)))
            for name, symbol in _TARGETS.items():
                capsule = jax.ffi.pycapsule(getattr(library, symbol))
                jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        except (RuntimeError, OSError, AttributeError) as err:
            unavailable_reason = str(err)
            _available = False
            warnings.warn(
                "addervit_jax.kernels.cpu_native: the native CPU kernels are unavailable, "
                f"using the XLA backend instead: {err}",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            _library = library
            _available = True
    return _available


def _require() -> None:
    if not available():
        raise RuntimeError(f"cpu_native kernels unavailable: {unavailable_reason}")


# ---------------------------------------------------------------------------------------------
# The calls, with their vmap rules
# ---------------------------------------------------------------------------------------------


def _f32(*arrays):
    return tuple(a.astype(jnp.float32) for a in arrays)


def _ffi(target: str, shape: tuple[int, ...], *args, dtype=jnp.float32, **attrs) -> jax.Array:
    result = jax.ShapeDtypeStruct(shape, dtype)
    return jax.ffi.ffi_call(target, result, vmap_method="sequential")(*args, **attrs)


def _rowwise(call, rows_args: int, batched=None):
    """``call(*args)`` whose first ``rows_args`` operands split by rows (and its result too).

    Under ``vmap`` with only those operands batched, the batch folds into the rows: one kernel
    call on ``(B * L, ...)`` operands. Any other batching calls ``batched`` on every operand
    broadcast to the batch, where given, and maps the kernel over the batch otherwise.
    """
    fn = jax.custom_batching.custom_vmap(call)

    @fn.def_vmap
    def rule(axis_size, in_batched, *args):
        if not any(in_batched[rows_args:]):
            rows = [
                a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
                for a, b in zip(args[:rows_args], in_batched[:rows_args], strict=True)
            ]
            length = rows[0].shape[1]
            out = fn(*(a.reshape(axis_size * length, a.shape[2]) for a in rows), *args[rows_args:])
            return out.reshape(axis_size, length, out.shape[1]), True
        if batched is not None:
            return batched(*_broadcast(axis_size, in_batched, args)), True
        return _mapped(fn, axis_size, in_batched, args), True

    return fn


def _broadcast(axis_size, in_batched, args):
    return [
        a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
        for a, b in zip(args, in_batched, strict=True)
    ]


def _folded(call):
    """``call`` on operands with one leading batch axis, under ``vmap`` too: further batch axes
    fold into that one (one kernel call for a ``vmap`` of a ``vmap``)."""
    fn = jax.custom_batching.custom_vmap(call)

    @fn.def_vmap
    def rule(axis_size, in_batched, *args):
        args = [a.reshape(-1, *a.shape[2:]) for a in _broadcast(axis_size, in_batched, args)]
        out = fn(*args)
        return out.reshape(axis_size, -1, *out.shape[1:]), True

    return fn


def _mapped(fn, axis_size, in_batched, args):
    return lax.map(lambda xs: fn(*xs), tuple(_broadcast(axis_size, in_batched, args)))


@functools.cache
def _sad_rows(negate: bool):
    def call(a, b):
        shape = (a.shape[0], b.shape[1])
        return _ffi("addervit_sad_u8", shape, a, b, dtype=jnp.int32, negate=np.int32(negate))

    return _rowwise(call, rows_args=1)


def _forward_call(x, w, e):
    return _ffi("addervit_adder_forward", (x.shape[0], w.shape[1]), x, w, e)


def _batched_forward_call(x, w, e):
    shape = (x.shape[0], x.shape[1], w.shape[2])
    return _ffi("addervit_adder_batched_forward", shape, x, w, e)


# a batch of weights (the L1 scores: keys per example and head): one call, the batch over threads
_forward_rows = _rowwise(_forward_call, rows_args=1, batched=_folded(_batched_forward_call))


@functools.cache
def _x_grad_rows(rule: int, clip_scale: float):
    def call(x, g, w, e):
        return _ffi(
            "addervit_adder_x_grad",
            x.shape,
            x,
            w,
            g,
            e,
            rule=np.int32(rule),
            clip_scale=np.float32(clip_scale),
        )

    return _rowwise(call, rows_args=2)


def _w_grad_exact_call(x, g, w, e):
    return _ffi("addervit_adder_w_grad_exact", w.shape, x, w, g, e)


# dL/dw sums over the rows, so a batch cannot fold into them: vmap maps it.
_w_grad_exact_mapped = jax.custom_batching.custom_vmap(_w_grad_exact_call)


@_w_grad_exact_mapped.def_vmap
def _w_grad_exact_vmap(axis_size, in_batched, *args):
    return _mapped(_w_grad_exact_mapped, axis_size, in_batched, args), True


def _ones_if_none(e: jax.Array | None, size: int) -> jax.Array:
    return jnp.ones((size,), jnp.float32) if e is None else e


# ---------------------------------------------------------------------------------------------
# Public kernels: the signatures of kernels/adder_pallas.py, without `interpret`
# ---------------------------------------------------------------------------------------------


@jax.jit
def forward(x: jax.Array, w: jax.Array, e: jax.Array | None = None) -> jax.Array:
    """``y[l, d] = -sum_i |x[l, i] * e[i] - w[i, d]|`` for 2-D ``x`` (L, D_in), ``w`` (D_in, D_out).

    ``e`` (D_in,) is the stretch (None: ones). Accumulates in float32 and returns
    ``result_type(x, w)``.
    """
    (length, d_in), d_out = x.shape, w.shape[1]
    out_dtype = jnp.result_type(x, w)
    if length * d_in * d_out == 0:
        return jnp.zeros((length, d_out), out_dtype)
    _require()
    y = _forward_rows(*_f32(x, w, _ones_if_none(e, d_in)))
    return y.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("grad", "clip_scale"))
def x_grad(
    x: jax.Array,
    w: jax.Array,
    g: jax.Array,
    e: jax.Array | None = None,
    *,
    grad: str,
    clip_scale: float = 4.0,
) -> jax.Array:
    """dL/du ``[l, i] = sum_d g[l, d] * s(w[i, d] - x[l, i] * e[i])`` in float32.

    ``s`` is ``grad``'s surrogate: ``sign`` (``"exact"``), ``hardtanh`` (``"addernet"``) or
    ``hardtanh(clip_scale * .)`` (``"clipped"``). Returns float32 (L, D_in); the caller casts
    after applying the stretch's chain rule.
    """
    if grad not in _X_GRAD_RULES:
        raise ValueError(f"x_grad: unknown grad={grad!r}; expected one of {tuple(_X_GRAD_RULES)}")
    (length, d_in), d_out = x.shape, w.shape[1]
    if length * d_in * d_out == 0:
        return jnp.zeros((length, d_in), jnp.float32)
    _require()
    scale = float(clip_scale) if grad == "clipped" else 1.0
    call = _x_grad_rows(_X_GRAD_RULES[grad], scale)
    x, g, w, e = _f32(x, g, w, _ones_if_none(e, d_in))
    return call(x, g, w, e)


@jax.jit
def w_grad_exact(x: jax.Array, w: jax.Array, g: jax.Array, e: jax.Array | None = None) -> jax.Array:
    """dL/dw ``[i, d] = sum_l g[l, d] * sign(x[l, i] * e[i] - w[i, d])`` in float32."""
    (length, d_in), d_out = x.shape, w.shape[1]
    if length * d_in * d_out == 0:
        return jnp.zeros((d_in, d_out), jnp.float32)
    _require()
    x, g, w, e = _f32(x, g, w, _ones_if_none(e, d_in))
    return _w_grad_exact_mapped(x, g, w, e)


# Sums of 8-bit codes stay exact in int32 up to this many terms (2**31 - 1 over 255).
SAD_MAX_TERMS = (2**31 - 1) // 255


@functools.partial(jax.jit, static_argnames="negate")
def sad(a: jax.Array, b: jax.Array, *, negate: bool = False) -> jax.Array:
    """``out[l, n] = sum_k |a[l, k] - b[k, n]|`` for uint8 ``a`` (L, K) and ``b`` (K, N), in
    int32 (exact: every term is an integer up to 255, and ``K`` is at most
    :data:`SAD_MAX_TERMS`); with ``negate``, ``-out`` (the adder's sign) from the kernel itself.

    Computed with PSADBW (``"avx512bw"`` or ``"avx2"``) or portable C++, whichever
    :func:`sad_path` says this build has; the int8 adder layer's kernel
    (:mod:`addervit_jax.adder.quantized`). Under :func:`jax.vmap` a batch of ``a`` alone folds into
    its rows.
    """
    if a.dtype != jnp.uint8 or b.dtype != jnp.uint8 or a.ndim != 2 or b.ndim != 2:
        raise TypeError(
            f"sad: a (L, K) and b (K, N) must be 2-D uint8, got a {a.dtype}{list(a.shape)}, "
            f"b {b.dtype}{list(b.shape)}"
        )
    (length, k), n = a.shape, b.shape[1]
    if b.shape[0] != k:
        raise ValueError(f"sad: a.shape[1]={k} must equal b.shape[0]={b.shape[0]}")
    if k > SAD_MAX_TERMS:
        raise ValueError(f"sad: K={k} terms could overflow int32 (at most {SAD_MAX_TERMS})")
    if length * k * n == 0:
        return jnp.zeros((length, n), jnp.int32)
    _require()
    return _sad_rows(bool(negate))(a, b)


@functools.cache
def _int8_layer_rows(norm: bool, epsilon: float):
    def call(x, e, w, grid, mask, bias):
        return _ffi(
            "addervit_adder_int8_layer",
            (x.shape[0], w.shape[1]),
            x,
            e,
            w,
            grid,
            mask,
            bias,
            norm=np.int32(norm),
            epsilon=np.float32(epsilon),
        )

    return _rowwise(call, rows_args=1)


@functools.partial(jax.jit, static_argnames=("norm", "epsilon"))
def adder_int8_layer(
    x: jax.Array,
    e: jax.Array,
    w: jax.Array,
    grid: jax.Array,
    mask: jax.Array,
    bias: jax.Array,
    *,
    norm: bool,
    epsilon: float = 1e-5,
) -> jax.Array:
    """The int8 adder layer in one pass: ``mask * N(-scale * sad(codes(x * e), w)) + bias``.

    ``x`` (L, K) and ``e`` (K,) float32; ``w`` (K, N) uint8 codes; ``grid`` = ``(low, scale)``;
    ``codes(v) = clip(rint((v - low) / scale), 0, 255)`` formed while the rows are packed;
    ``N`` a LayerNorm over each row without affine parameters (``norm``, with ``epsilon``) or the
    identity; ``mask``, ``bias`` (N,). Returns float32 (L, N).
    """
    (length, k), n = x.shape, w.shape[1]
    if w.dtype != jnp.uint8 or w.shape[0] != k:
        raise TypeError(f"adder_int8_layer: w must be uint8 ({k}, N), got {w.dtype}{list(w.shape)}")
    if k > SAD_MAX_TERMS:
        raise ValueError(f"adder_int8_layer: K={k} terms could overflow int32")
    if length * n == 0:
        return jnp.zeros((length, n), jnp.float32)
    _require()
    args = _f32(x, e, grid, mask, bias)
    return _int8_layer_rows(bool(norm), float(epsilon))(args[0], args[1], w, *args[2:])


def sad_reference(a, b) -> np.ndarray:
    """:func:`sad` in NumPy integers (int64 sums of int16 differences), for tests."""
    a, b = np.asarray(a).astype(np.int16), np.asarray(b).astype(np.int16)
    return np.abs(a[:, :, None] - b[None, :, :]).sum(axis=1, dtype=np.int64)


def sad_path() -> str:
    """The SAD kernel's instruction path in this build: ``"avx512bw"``, ``"avx2"`` or
    ``"portable"`` (decided by the compiler flags, ``-march=native`` and ``$ADDERVIT_CXXFLAGS``)."""
    _require()
    fn = _library.AddervitSadPath
    fn.restype = ctypes.c_char_p
    return fn().decode()


@functools.cache
def _int8_matmul_rows():
    def call(x, w):
        length = x.shape[0]
        return jax.ffi.ffi_call(
            "addervit_int8_matmul",
            (
                jax.ShapeDtypeStruct((length, w.shape[1]), jnp.int32),
                jax.ShapeDtypeStruct((length,), jnp.float32),
            ),
            vmap_method="sequential",
        )(x, w)

    return call


@jax.jit
def int8_matmul(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The int8 product of an int8 multi or ternary site, with the activations' coding fused:
    ``(sums, scale)`` with ``sums[l, n] = sum_k q[l, k] * w[k, n]`` in int32 (exact) and
    ``q``, ``scale`` (L,) the per-row codes and scale of ``quantizers.absmax_int8(x)``
    (``x ~= q / scale``), formed by the kernel while it reads ``x``.

    ``x`` (L, K) float32 (other floats are cast); ``w`` (K, N) int8. The products run in
    oneDNN's int8 matmul (:func:`int8_matmul_path`); where this build has none, ``RuntimeError``
    (``ops.int8_matmul`` then runs XLA's). A NaN in a row gives that row a NaN scale (its codes
    are 0; a row with an infinity: scale 0, as XLA's formula gives, and codes 0). Exact in
    int32 for K up to ``ops.INT8_MATMUL_MAX_TERMS`` (``ops.int8_matmul`` refuses more).
    """
    _check_int8("int8_matmul", x, w)
    return _int8_matmul_rows()(x.astype(jnp.float32), w)


def _check_int8(name: str, x, w) -> None:
    if w.dtype != jnp.int8 or w.ndim != 2 or x.ndim != 2 or x.shape[1] != w.shape[0]:
        raise TypeError(
            f"{name}: expected x (L, K) float and w (K, N) int8, got x {x.dtype}"
            f"{list(x.shape)}, w {w.dtype}{list(w.shape)}"
        )
    if int8_matmul_path() != "onednn":
        raise RuntimeError(f"{name}: this build of cpu_native has no oneDNN")


@functools.cache
def _ternary_matmul_rows(n: int):
    def call(x, packed):
        length = x.shape[0]
        return jax.ffi.ffi_call(
            "addervit_ternary_matmul",
            (
                jax.ShapeDtypeStruct((length, n), jnp.int32),
                jax.ShapeDtypeStruct((length,), jnp.float32),
            ),
            vmap_method="sequential",
        )(x, packed, n=np.int64(n))

    return call


@functools.partial(jax.jit, static_argnames="n")
def ternary_matmul(x: jax.Array, packed: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """:func:`int8_matmul` with ternary weights stored in 2 bits: ``packed`` (K, ceil(n / 4))
    uint8 of ``quantizers.pack_ternary``, unpacked by the kernel once per call (a table lookup
    per byte) before the product."""
    _check_ternary("ternary_matmul", x, packed, n)
    return _ternary_matmul_rows(int(n))(x.astype(jnp.float32), packed)


def _check_ternary(name: str, x, packed, n: int) -> None:
    if packed.dtype != jnp.uint8 or packed.ndim != 2 or x.ndim != 2:
        raise TypeError(
            f"{name}: expected x (L, K) float and packed (K, P) uint8, got x {x.dtype}"
            f"{list(x.shape)}, packed {packed.dtype}{list(packed.shape)}"
        )
    if x.shape[1] != packed.shape[0] or packed.shape[1] != -(-n // 4):
        raise ValueError(
            f"{name}: packed must be (K, ceil(n / 4)) = ({x.shape[1]}, {-(-n // 4)}) "
            f"for x {list(x.shape)} and n={n}, got {list(packed.shape)}"
        )
    if int8_matmul_path() != "onednn":
        raise RuntimeError(f"{name}: this build of cpu_native has no oneDNN")


@jax.jit
def int8_dense(x: jax.Array, w: jax.Array, col: jax.Array, bias: jax.Array) -> jax.Array:
    """:func:`int8_matmul` with the sites' rescale fused into its jobs: ``y[l, n] = sums[l, n]
    * col[n] * (1 / scale[l]) + bias[n]`` in float32 (rounded in that order), the int32 sums
    never written out. ``col`` and ``bias``: (N,) float32."""
    _check_int8("int8_dense", x, w)
    _check_rescale("int8_dense", w.shape[1], col, bias)
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call("addervit_int8_dense", out, vmap_method="sequential")(
        x.astype(jnp.float32), w, col.astype(jnp.float32), bias.astype(jnp.float32)
    )


@functools.partial(jax.jit, static_argnames="n")
def ternary_dense(
    x: jax.Array, packed: jax.Array, n: int, col: jax.Array, bias: jax.Array
) -> jax.Array:
    """:func:`int8_dense` with ternary weights stored in 2 bits (:func:`ternary_matmul`)."""
    _check_ternary("ternary_dense", x, packed, n)
    _check_rescale("ternary_dense", n, col, bias)
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call("addervit_ternary_dense", out, vmap_method="sequential")(
        x.astype(jnp.float32),
        packed,
        col.astype(jnp.float32),
        bias.astype(jnp.float32),
        n=np.int64(n),
    )


def _check_rescale(name: str, n: int, col, bias) -> None:
    if col.shape != (n,) or bias.shape != (n,):
        raise ValueError(
            f"{name}: col and bias must be ({n},), one per output, got {list(col.shape)} and "
            f"{list(bias.shape)}"
        )


def int8_matmul_path() -> str | None:
    """The library behind :func:`int8_matmul` in this build: ``"onednn"``, or None where the
    native kernels are unavailable or were built without oneDNN (:func:`onednn_flags`)."""
    if not available():
        return None
    fn = _library.AddervitInt8MatmulPath
    fn.restype = ctypes.c_char_p
    return fn().decode() or None


def int8_matmul_reference(q, w) -> np.ndarray:
    """The sums of :func:`int8_matmul` in NumPy integers (int64), for tests."""
    return np.asarray(q).astype(np.int64) @ np.asarray(w).astype(np.int64)
