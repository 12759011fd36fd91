"""Node vitals: CPU load, battery and link quality, each 0..100 or unknown (None), read from /proc and /sys.

One sampler per process (`NodeVitals`, owned by the core): CPU busy time is measured since the previous
read, so a second reader would shorten the first one's window. The files are parsed here (a few lines of
/proc/stat and /sys/class/power_supply): psutil reads the same files, and importing it would cost the daemon
about 1 MiB of RSS, so edged does not depend on it. Tiers hear of each reading (the
edge tier puts it in its TXT record, the cloud tier in its retained status) and never read vitals themselves.

Hardware that is absent (no battery, no Wi-Fi) reads as unknown, never as 0 and never as an error: a reader that
meets a missing or garbled file returns None for that vital. The roots are injectable so that tests (and a
container that mounts the host's /proc and /sys elsewhere) can point the readers at other trees.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("edged.vitals")

POWER_STATES = ("battery", "mains", "")
# A change smaller than these is not worth a multicast TXT update (percentage points).
CPU_STEP = 15
BATTERY_STEP = 5
LINK_STEP = 10
BATTERY_LOW = 20  # crossing this is always meaningful: `battery_min` policies are usually set around here
WIFI_QUALITY_MAX = 70.0  # most Linux drivers report link quality out of 70 in /proc/net/wireless


@dataclass(frozen=True, slots=True)
class Vitals:
    """One reading of a node's vitals. None = unknown; `power` is "battery", "mains" or "" (unknown)."""

    cpu: int | None = None  # busy %
    bat: int | None = None  # battery charge %
    power: str = ""
    link: int | None = None  # link quality %

    def meta(self) -> tuple[tuple[str, str], ...]:
        """As `Endpoint.meta` items (the keys `edged.policy` reads)."""
        return (("bat", _text(self.bat)), ("cpu", _text(self.cpu)), ("link", _text(self.link)), ("power", self.power))

    def txt(self) -> dict[str, str]:
        """As TXT keys of the node's `_hubmesh._tcp` record."""
        return {"cpu": _text(self.cpu), "bat": _text(self.bat), "pwr": self.power, "link": _text(self.link)}

    @classmethod
    def from_txt(cls, props: dict[str, str]) -> Vitals:
        """From TXT keys; anything missing or garbled is unknown."""
        power = props.get("pwr", "")
        return cls(
            cpu=_percent(props.get("cpu")),
            bat=_percent(props.get("bat")),
            power=power if power in POWER_STATES else "",
            link=_percent(props.get("link")),
        )

    def status(self) -> dict[str, str]:
        """As the cloud tier's retained status carries them: "cpu", "bat", "link" ("" when unknown), "power"."""
        return {"cpu": _text(self.cpu), "bat": _text(self.bat), "link": _text(self.link), "power": self.power}

    def differs_from(self, other: Vitals) -> bool:
        """Whether peers should hear about the change: known/unknown flips, power source, big steps, low battery."""
        if self.power != other.power:
            return True
        if _moved(self.cpu, other.cpu, CPU_STEP) or _moved(self.link, other.link, LINK_STEP):
            return True
        if _moved(self.bat, other.bat, BATTERY_STEP):
            return True
        if self.bat is not None and other.bat is not None:
            return (self.bat < BATTERY_LOW) != (other.bat < BATTERY_LOW)
        return False


def _text(value: int | None) -> str:
    return "" if value is None else str(value)


def _percent(value: object) -> int | None:
    """0..100 from a number or text; None for anything else (a peer's TXT is not trusted)."""
    if value is None or value == "":
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if number != number:  # NaN
        return None
    return max(0, min(100, round(number)))


def _moved(a: int | None, b: int | None, step: int) -> bool:
    if (a is None) != (b is None):
        return True
    return a is not None and b is not None and abs(a - b) >= step


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


class VitalsReader:
    """Reads this node's vitals: parses `{proc_root}/stat`, `loadavg`, `net/wireless` and
    `{sys_root}/class/power_supply`."""

    def __init__(self, proc_root: str = "/proc", sys_root: str = "/sys") -> None:
        self.proc = Path(proc_root)
        self.sys = Path(sys_root)
        self._stat: tuple[int, int] | None = self._read_stat()  # (busy, total) jiffies at the last read

    def read(self) -> Vitals:
        """All vitals now. Never raises: what cannot be read is unknown."""
        bat, power = self.battery()
        return Vitals(cpu=self.cpu(), bat=bat, power=power, link=self.wifi())

    # -- CPU ------------------------------------------------------------------------------------------
    def cpu(self) -> int | None:
        """Busy %: the mean of CPU time used since the last read and the 1-minute load per core (capped)."""
        busy = self._busy_percent()
        load = self._load_percent()
        parts = [p for p in (busy, load) if p is not None]
        return None if not parts else _percent(sum(parts) / len(parts))

    def _busy_percent(self) -> float | None:
        now = self._read_stat()
        last, self._stat = self._stat, now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return 100.0 * (now[0] - last[0]) / (now[1] - last[1])

    def _read_stat(self) -> tuple[int, int] | None:
        text = _read(self.proc / "stat")
        if not text:
            return None
        fields = text.splitlines()[0].split()
        if not fields or fields[0] != "cpu":
            return None
        try:
            jiffies = [int(x) for x in fields[1:]]
        except ValueError:
            return None
        if len(jiffies) < 4:
            return None
        idle = jiffies[3] + (jiffies[4] if len(jiffies) > 4 else 0)  # idle + iowait
        total = sum(jiffies[:8])  # guest time is already counted in user
        return total - idle, total

    def _load_percent(self) -> float | None:
        text = _read(self.proc / "loadavg")
        cores = self._cores()
        if not text or not cores:
            return None
        try:
            load1 = float(text.split()[0])
        except (ValueError, IndexError):
            return None
        return min(100.0, 100.0 * load1 / cores)

    def _cores(self) -> int | None:
        text = _read(self.proc / "stat") or ""
        count = sum(1 for line in text.splitlines() if line.startswith("cpu") and line[3:4].isdigit())
        return count or None

    # -- battery --------------------------------------------------------------------------------------
    def battery(self) -> tuple[int | None, str]:
        """(charge %, power source). No battery: (None, "") — mains is assumed by the policy, 0 is never made up."""
        return self._sysfs_battery()

    def _sysfs_battery(self) -> tuple[int | None, str]:
        base = self.sys / "class" / "power_supply"
        try:
            supplies = sorted(base.iterdir())
        except OSError:
            return None, ""
        charges: list[int] = []
        discharging = charging = False
        mains_online: bool | None = None
        for supply in supplies:
            kind = (_read(supply / "type") or "").lower()
            if kind == "battery":
                if (_read(supply / "scope") or "").lower() == "device":
                    continue  # a mouse or a headset, not what powers the box
                charge = _battery_charge(supply)
                if charge is not None:
                    charges.append(charge)
                status = (_read(supply / "status") or "").lower()
                discharging |= status == "discharging"
                charging |= status in ("charging", "full", "not charging")
            elif kind in ("mains", "usb", "ups"):
                online = _read(supply / "online")
                if online in ("0", "1"):
                    mains_online = bool(mains_online) or online == "1"
        bat = min(charges) if charges else None
        if mains_online:
            power = "mains"
        elif discharging or (mains_online is False and charges):
            power = "battery"
        elif charging:
            power = "mains"
        else:
            power = ""
        return bat, power

    # -- link -----------------------------------------------------------------------------------------
    def wifi(self) -> int | None:
        """Wi-Fi link quality % of the best wireless interface in /proc/net/wireless; None when there is none."""
        text = _read(self.proc / "net" / "wireless")
        if not text:
            return None
        best: int | None = None
        for line in text.splitlines()[2:]:
            name, sep, rest = line.partition(":")
            fields = rest.split()
            if not sep or not name.strip() or len(fields) < 2:
                continue
            quality = _percent(100.0 * _number(fields[1]) / WIFI_QUALITY_MAX) if _number(fields[1]) else None
            if quality is not None and (best is None or quality > best):
                best = quality
        return best


def _number(text: str) -> float:
    try:
        return float(text.rstrip("."))
    except ValueError:
        return 0.0


def _battery_charge(supply: Path) -> int | None:
    capacity = _percent(_read(supply / "capacity"))
    if capacity is not None:
        return capacity
    for now, full in (("energy_now", "energy_full"), ("charge_now", "charge_full")):
        try:
            a, b = float(_read(supply / now) or ""), float(_read(supply / full) or "")
        except ValueError:
            continue
        if b > 0:
            return _percent(100.0 * a / b)
    return None


VITAL_KINDS = ("cpu", "bat", "link")


class NodeVitals:
    """The one vitals sampler of a process: reads every `interval`, keeps the gauge `edged_node_vitals`
    current, and hands each reading to the listeners the tiers returned."""

    def __init__(
        self,
        reader: VitalsReader,
        *,
        interval: float,
        gauge,  # Gauge with the label ("kind",)
        listeners: Sequence[Callable[[Vitals], None]] = (),
    ) -> None:
        self.reader = reader
        self.interval = interval
        self._gauge = gauge
        self.listeners = list(listeners)
        self.current = Vitals()

    def __repr__(self) -> str:
        return f"<NodeVitals every {self.interval}s {self.current}>"

    def read(self) -> Vitals:
        """Read now, update the gauge; listeners are told by `run` (not at this first reading)."""
        self.current = self.reader.read()
        for kind in VITAL_KINDS:
            value = getattr(self.current, kind)
            if value is None:
                self._gauge.remove((kind,))
            else:
                self._gauge.set((kind,), float(value))
        return self.current

    async def run(self) -> None:
        """Read every `interval` and tell each listener (a listener's bug is logged, not fatal)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                vitals = self.read()
            except Exception:  # the reader never raises; this guards the loop against what it did not foresee
                log.exception("reading vitals failed")
                continue
            for listener in self.listeners:
                try:
                    listener(vitals)
                except Exception:
                    log.exception("a vitals listener failed")
