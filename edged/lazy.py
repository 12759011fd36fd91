"""Deferred imports of modules that a library imports at its top but uses only on a path edged never takes.

paho-mqtt imports `urllib.request` (which brings http.client, email, tempfile and shutil) to read proxy
settings, and reads them only when PySocks is installed: about 2 MiB of RSS for a daemon that never asks.
A stand-in in `sys.modules` lets such an import succeed for free; the first attribute read imports the real
module, so a path that does use it still works as before. (importlib.util.LazyLoader does not help here:
CPython's import statement reads the module's `__spec__` when it is already in `sys.modules`, and that read
would load it at once.)

`ssl` is the same idea with a few attributes given up front (`defer_ssl`): asyncio and uvloop read them at
their import, but a daemon with no TLS configured never builds a context.
"""

from __future__ import annotations

import codecs
import importlib
import sys
import threading
import types
from collections.abc import Callable, Mapping
from typing import Any

_STAND_INS: dict[str, types.ModuleType] = {}  # name: its stand-in, until the real module is imported
_THEN: dict[str, tuple[str, ...]] = {}  # name: what to import for real with it
_LOCK = threading.RLock()  # two threads reading a stand-in at once import the real module once


def defer_import(
    name: str, eager: Mapping[str, object] | None = None, then: tuple[str, ...] = (), absent: tuple[str, ...] = ()
) -> None:
    """Let `import name` cost nothing until something reads an attribute of the module that is not in
    `eager` (given to the stand-in as they are); the modules `then` are imported for real right after it.
    Reading a name in `absent` (ones the real module lacks, which an importer tests for) raises
    AttributeError without importing. No-op when the module is already imported (or deferred). `name` is a
    module, not a package.

    Once the real module is imported, the stand-in takes all its attributes, so a library that kept the
    stand-in from its own `import name` sees the real module's names from then on."""
    if name in sys.modules:
        return
    stub = types.ModuleType(name, "stand-in until first use (edged.lazy.defer_import)")
    stub.__dict__.update(eager or {})
    # The import statement checks __spec__._initializing of a module found in sys.modules: with None it reads
    # nothing else of the stand-in (an attribute read here would import the real module).
    stub.__spec__ = None

    def load(attr: str) -> object:
        if attr == "__path__" or attr in absent:  # `from name import x` asks whether it is a package: not
            raise AttributeError(attr)
        return getattr(real_module(name), attr)

    stub.__getattr__ = load  # type: ignore[method-assign]  # PEP 562: called for any attribute it lacks
    _STAND_INS[name] = stub
    _THEN[name] = then
    sys.modules[name] = stub
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), child, stub)


def is_deferred(name: str) -> bool:
    """Whether `name` is still a stand-in: its real module not imported."""
    stub = _STAND_INS.get(name)
    return stub is not None and sys.modules.get(name) is stub


def real_module(name: str) -> types.ModuleType:
    """The module `name`, imported now if it is a stand-in."""
    with _LOCK:
        stub = _STAND_INS.pop(name, None)
        if stub is None or sys.modules.get(name) is not stub:
            return importlib.import_module(name)
        del sys.modules[name]  # importlib then imports the real module and rebinds the parent's attribute
        try:
            real = importlib.import_module(name)
        except BaseException:
            sys.modules[name], _STAND_INS[name] = stub, stub
            raise
        stub.__dict__.update(real.__dict__)
        for other in _THEN.pop(name, ()):
            real_module(other)
        return real


# What asyncio (sslproto: SSLAgainErrors) and uvloop (includes/stdlib.pxi) read of `ssl` at their import.
# They are the objects of the C module `_ssl`, which the real `ssl` re-exports: the same objects either way.
_SSL_FROM_C = (
    "SSLError",
    "SSLZeroReturnError",
    "SSLWantReadError",
    "SSLWantWriteError",
    "SSLSyscallError",
    "SSLEOFError",
    "SSLCertVerificationError",
    "MemoryBIO",
    "SSLSession",
    "SSL_ERROR_WANT_READ",
    "SSL_ERROR_WANT_WRITE",
    "SSL_ERROR_SYSCALL",
    "SSL_ERROR_ZERO_RETURN",
    "SSL_ERROR_SSL",
    "SSL_ERROR_EOF",
    "OPENSSL_VERSION",
    "OPENSSL_VERSION_INFO",
    "OPENSSL_VERSION_NUMBER",
)


class _StandInClass(type):
    """Metaclass of a stand-in for a class of a deferred module: a call builds an instance of the real class,
    and `isinstance` / `issubclass` answer for the real class (False while it is not imported: nothing can be
    an instance of it yet)."""

    _module: str
    _real: Callable[[], type]

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real()(*args, **kwargs)

    def __instancecheck__(cls, obj: object) -> bool:
        return not is_deferred(cls._module) and isinstance(obj, cls._real())

    def __subclasscheck__(cls, sub: type) -> bool:
        return not is_deferred(cls._module) and issubclass(sub, cls._real())


def _stand_in_class(module: str, name: str) -> type:
    def real() -> type:
        return getattr(real_module(module), name)

    return _StandInClass(name, (), {"_module": module, "_real": staticmethod(real), "__module__": module})


def defer_ssl() -> None:
    """Defer `ssl` (about 1.8 MiB of RSS: its module-level enums look up OIDs in libcrypto's object table)
    until something reads more of it than asyncio and uvloop do at their import. Call it before asyncio is
    imported; a no-op when ssl already is.

    uvloop also keeps `ssl.SSLContext` (for isinstance checks) and `ssl.create_default_context` from its
    import: it gets a stand-in class (calls and isinstance go to the real class) and a function that imports
    ssl and calls the real one."""
    if "ssl" in sys.modules:
        return
    import _ssl

    eager: dict[str, object] = {name: getattr(_ssl, name) for name in _SSL_FROM_C if hasattr(_ssl, name)}
    eager["CertificateError"] = _ssl.SSLCertVerificationError  # ssl.py's alias

    def create_default_context(*args: Any, **kwargs: Any) -> Any:
        return real_module("ssl").create_default_context(*args, **kwargs)

    eager["create_default_context"] = create_default_context
    eager["SSLContext"] = _stand_in_class("ssl", "SSLContext")
    defer_import("ssl", eager)


def defer_hashing() -> None:
    """Defer OpenSSL's hashing (`_hashlib`: about 2 MiB of RSS, most of it the digests it lists from OpenSSL
    at its import) behind `hashlib` and `hmac` until something needs more than an idle daemon does: SHA-256
    of a few short strings (node addresses, key ids, tokens) and `hmac.compare_digest` (`secrets`).

    Until then `hashlib.sha256` is CPython's own SHA-256 (the same digests; as fast for inputs under about
    100 bytes, slower for long ones). The first use of `hmac` (the cloud tier's MACs) or of any other name of
    `hashlib` imports both for real, and from then on `hashlib.sha256` is OpenSSL's again. Call it before
    anything imports them; a no-op for what already is."""
    if "_hashlib" in sys.modules:
        return
    import _operator

    try:
        from _sha2 import sha256  # Python 3.12 and later
    except ImportError:
        try:
            from _sha256 import sha256  # Python 3.10 and 3.11
        except ImportError:  # a build without CPython's own SHA-256: nothing to defer to
            return

    defer_import("hashlib", {"sha256": sha256})
    # hmac's own choice when it has no _hashlib: the same constant-time comparison.
    defer_import("hmac", {"compare_digest": _operator._compare_digest}, then=("hashlib",))


def defer_idna() -> None:
    """Defer the `idna` codec (about 0.2 MiB: encodings.idna imports stringprep and unicodedata's tables)
    until a host name that is not plain ASCII is encoded. Every `getaddrinfo` and uvloop's listen and
    connect encode their host with it, and an edge box's hosts are addresses and ASCII names, for which
    encodings.idna's own fast path (copied here) checks label lengths and returns the ASCII bytes. Anything
    else, and every other use of the codec, goes to the real module."""
    if "encodings.idna" in sys.modules:
        return

    def real() -> types.ModuleType:
        return real_module("encodings.idna")

    def encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
        if errors == "strict" and text.isascii():
            result = text.encode("ascii")
            labels = result.split(b".")
            if all(0 < len(label) < 64 for label in labels[:-1]) and len(labels[-1]) < 64:
                return result, len(text)
        return real().Codec().encode(text, errors)  # and the errors it raises for a bad label

    def decode(data: bytes, errors: str = "strict") -> tuple[str, int]:
        return real().Codec().decode(data, errors)

    def regentry() -> codecs.CodecInfo:
        return codecs.CodecInfo(
            name="idna",
            encode=encode,
            decode=decode,
            incrementalencoder=lambda errors="strict": real().IncrementalEncoder(errors),
            incrementaldecoder=lambda errors="strict": real().IncrementalDecoder(errors),
            streamwriter=lambda stream, errors="strict": real().StreamWriter(stream, errors),
            streamreader=lambda stream, errors="strict": real().StreamReader(stream, errors),
        )

    # encodings.search_function reads getregentry, then tries getaliases (which encodings.idna lacks).
    defer_import("encodings.idna", {"getregentry": regentry}, absent=("getaliases",))


def defer_for_daemon() -> None:
    """Everything `edged run` defers, before it imports the rest of edged (a daemon that runs for months
    keeps what it imported): shutil's bz2 and lzma (imported by argparse, tempfile and ctypes.util, used
    for archives: about 0.4 MiB), ssl and OpenSSL's hashing (about 2.4 MiB without TLS and cloud MACs), and
    the idna codec's tables (non-ASCII host names). Each is imported for real if anything uses it."""
    for name in ("bz2", "lzma"):
        defer_import(name)
    defer_ssl()
    defer_hashing()
    defer_idna()
