"""Manifest files as a discovery source: load, validate, reload on change or SIGHUP, keep the last good set."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence

from ..errors import ConfigError
from ..manifest import dirs_signature, load_manifest_dirs
from ..model import ServiceSpec
from ..registry import Registry

log = logging.getLogger("edged.manifests")


class ManifestSource:
    """Feeds the registry from manifest dirs. A file that turns bad keeps its last good version in force."""

    def __init__(
        self,
        registry: Registry,
        dirs: Sequence[str],
        *,
        extra: Sequence[ServiceSpec] = (),
        on_errors: Callable[[list[ConfigError]], None] | None = None,
    ) -> None:
        self._registry = registry
        self._dirs = tuple(dirs)
        self._extra = tuple(extra)  # built-in services (the demo `echo`)
        self._on_errors = on_errors
        self._by_file: dict[str, ServiceSpec] = {}
        self._signature: tuple = ()
        self._interval = 2.0
        self.errors: list[ConfigError] = []

    def configure(self, dirs: Sequence[str], extra: Sequence[ServiceSpec], interval: float) -> None:
        """New folders, built-in services and watch interval (a config reload); `reload()` reads them."""
        self._dirs = tuple(dirs)
        self._extra = tuple(extra)
        self._interval = interval

    def reload(self) -> list[ConfigError]:
        """Read every manifest again; returns the errors (also logged). Never raises for a bad file."""
        self._signature = dirs_signature(self._dirs)
        specs, errors = load_manifest_dirs(self._dirs)
        fresh = {spec.source: spec for spec in specs}
        unlisted = {os.path.normpath(err.file) for err in errors if err.file in self._dirs}
        for source, spec in self._by_file.items():
            # A folder that could not be listed (descriptors exhausted, permissions) keeps its last good files.
            if os.path.normpath(os.path.dirname(source)) in unlisted:
                fresh.setdefault(source, spec)
        for err in errors:
            kept = self._by_file.get(err.file)
            if kept is not None:
                fresh[err.file] = kept
            log.error("manifest refused: %s%s", err, " (keeping its last good version)" if kept else "")
        self._by_file = fresh
        self.errors = errors
        self._registry.set_manifests(self._dedupe(fresh.values()))
        if self._on_errors is not None:
            self._on_errors(errors)
        return errors

    def _dedupe(self, specs) -> list[ServiceSpec]:
        """A kept old version may now clash with a new file: the first (sorted by file) wins.

        Built-in services come last, so a file that declares the same service replaces them.
        """
        seen: set[tuple[str, str]] = set()
        out = []
        for spec in [*sorted(specs, key=lambda s: s.source), *self._extra]:
            if spec.key not in seen:
                seen.add(spec.key)
                out.append(spec)
        return out

    def changed(self) -> bool:
        return dirs_signature(self._dirs) != self._signature

    async def watch(self, interval: float) -> None:
        """Reload when a file in the dirs changes (mtime or size): no SIGHUP needed after an edit.

        `configure()` may change the interval while this runs; it takes effect after the current wait.
        """
        self._interval = interval
        while True:
            await asyncio.sleep(self._interval)
            try:
                if self.changed():
                    self.reload()
            except OSError as exc:  # a dir vanished mid-scan: try again next round
                log.warning("manifest dirs not readable: %s", exc)
            except Exception:  # a bug must not end the watch: the next change is still read
                log.exception("manifest reload failed; the last good set stays")
