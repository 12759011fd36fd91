#!/usr/bin/env python3
"""edged under a real systemd: install it with scripts/install.sh in a booted Debian 12 container and check it.

    sudo scripts/systemd_e2e.py                 # amd64: the whole list below (what .ci/run runs)
    sudo scripts/systemd_e2e.py --arch arm64    # arm64 / armhf under QEMU user emulation: the short list
    sudo scripts/systemd_e2e.py --arch armhf

A minimal Debian 12 root is made with debootstrap once and cached under /var/cache/edged-test/, named by
its suite, architecture and a hash of its package list, so a changed list makes a new root. Each run boots a
copy-on-write overlay of it with `systemd-nspawn --boot --private-network` (the container has only its own
loopback: the daemon's mDNS never reaches a real network), copies this checkout in, and installs edged
from wheels built or downloaded on the host into a wheelhouse (the container has no route to a registry;
pip inside reads PIP_NO_INDEX / PIP_FIND_LINKS). Then, through systemctl, journalctl and the edged CLI:

  install         scripts/install.sh: the unit reaches active (running) through Type=notify
  again           scripts/install.sh a second time (idempotent upgrade): still active, config kept
  status          `edged status` over the Unix socket as a member of group edged; refused for another user
  call            a call through the mesh to a real backend (python3 -m http.server) in the container
  reload          `systemctl reload`: a manifest change and an edged.toml change (a live key applied at once,
                  a restart-only key shown as pending restart in `edged status` and the journal)
  bad reload      a broken edged.toml on reload: reload fails, the daemon keeps serving, STATUS= names the error
  bad start       a broken edged.toml at start: one line in the journal, exit 78, no restart loop
  watchdog        SIGSTOP: the watchdog (WatchdogSec=3s in a drop-in) restarts it
  stop            `systemctl stop`: exit 0, the mDNS goodbye seen by a browser in the container
  reboot          the container reboots; edged comes back by itself
  security        `systemd-analyze security edged` exposure <= 2.0
  uninstall       scripts/install.sh --uninstall: unit and program gone, config kept

On arm64 and armhf (qemu-user-static through binfmt_misc): install, start, one call, stop; a drop-in turns
PrivateUsers= off there, the one unit setting QEMU user emulation cannot provide.
Prints one line per step with its result and time, then the figures; exits 1 when a step failed and 77
when this machine cannot boot a container at all (no root, no debootstrap/systemd-nspawn, no binfmt).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from harness import wait_for  # noqa: E402  (stdlib only, like this script)

CACHE = Path(os.environ.get("EDGED_TEST_CACHE", "/var/cache/edged-test"))
SUITE = "bookworm"
MIRROR = os.environ.get("EDGED_TEST_MIRROR", "http://deb.debian.org/debian")
PATH_INSIDE = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "python3-pip", "ca-certificates")
QEMU = {"arm64": "qemu-aarch64", "armhf": "qemu-arm"}
PIP_PLATFORMS = {
    "arm64": ("manylinux_2_36_aarch64", "manylinux_2_31_aarch64", "manylinux_2_28_aarch64", "manylinux2014_aarch64"),
    "armhf": ("manylinux_2_36_armv7l", "manylinux_2_31_armv7l", "manylinux_2_17_armv7l", "linux_armv7l"),
}
SKIP = 77  # the exit code of "cannot run here" (as automake's test drivers use it)


class Skip(Exception):
    """This machine cannot boot a systemd container: the reason, said plainly."""


class StepFailed(Exception):
    """A step's check failed: what was expected and what was seen."""


# ------------------------------------------------------------------------------------------ small helpers


def sh(cmd: list[str], *, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a host command, capturing text output; StepFailed with its output when it fails and `check`."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise StepFailed(f"{' '.join(cmd)} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}")
    return done


def installer_list(name: str) -> tuple[str, ...]:
    """A list the installer keeps for armhf (ARMHF_APT: Debian packages the root must have, as there is no
    network inside; ARMHF_PIP_CONSTRAINTS: what pip may pick, so the wheelhouse must hold those versions)."""
    m = re.search(rf'^{name}="([^"]*)"', (REPO / "scripts/install.sh").read_text(), re.M)
    if not m:
        raise SystemExit(f"scripts/install.sh has no {name}= line")
    return tuple(m.group(1).split())


def armhf_packages() -> tuple[str, ...]:
    return installer_list("ARMHF_APT")


def root_packages(arch: str) -> tuple[str, ...]:
    # debootstrap resolves no virtual packages: python3-pycparser (under python3-cffi) needs python3-ply named.
    extra = (*armhf_packages(), "python3-ply") if arch == "armhf" else ()
    return tuple(sorted({*BASE_PACKAGES, *extra}))


def root_name(arch: str) -> str:
    """The cached root's folder name: suite, arch and a hash of what goes in (a new list makes a new root)."""
    key = json.dumps({"suite": SUITE, "arch": arch, "variant": "minbase", "packages": root_packages(arch), "v": 1})
    return f"systemd-e2e-{SUITE}-{arch}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """One builder at a time per cache entry (two CI runs, or an engineer and CI, may share the machine)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def check_machine(arch: str) -> None:
    """Raise Skip when a systemd container truly cannot run here; the reason names what is missing."""
    if os.geteuid() != 0:
        raise Skip("needs root (debootstrap, mounts and systemd-nspawn)")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            raise Skip(f"{tool} is not installed (.ci/run installs debootstrap and systemd-container)")
    if arch != host_arch():
        binfmt = Path("/proc/sys/fs/binfmt_misc")
        if not (binfmt / "status").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)])
        if not (binfmt / QEMU[arch]).exists() and shutil.which("update-binfmts"):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                sh(["update-binfmts", "--enable", QEMU[arch]])
        entry = binfmt / QEMU[arch]
        if not entry.exists() or "enabled" not in entry.read_text():
            raise Skip(f"no binfmt_misc entry for {QEMU[arch]} (apt-get install qemu-user-static binfmt-support)")
        if "flags: " in entry.read_text() and "F" not in entry.read_text().split("flags: ")[1].split()[0]:
            raise Skip(f"binfmt_misc entry {QEMU[arch]} lacks the F flag: it cannot run inside a container")
    with tempfile.TemporaryDirectory() as tmp:  # overlayfs is how each run gets a throw-away copy of the root
        dirs = [Path(tmp, d) for d in ("lower", "upper", "work", "merged")]
        for d in dirs:
            d.mkdir()
        done = sh(["mount", "-t", "overlay", "overlay", "-o", _overlay_opts(*dirs[:3]), str(dirs[3])], check=False)
        if done.returncode != 0:
            raise Skip(f"cannot mount overlayfs: {done.stderr.strip()}")
        sh(["umount", str(dirs[3])])


def host_arch() -> str:
    return sh(["dpkg", "--print-architecture"]).stdout.strip()


def _overlay_opts(lower: Path, upper: Path, work: Path) -> str:
    return f"lowerdir={lower},upperdir={upper},workdir={work}"


# ------------------------------------------------------------------------------------- the cached root


def ensure_root(arch: str, log) -> tuple[Path, bool]:
    """The cached root for `arch`, made with debootstrap when missing. Returns (path, whether it was cached)."""
    name = root_name(arch)
    path = CACHE / name
    with locked(name):
        if (path / ".edged-root-ok").exists():
            return path, True
        tmp = CACHE / f"{name}.partial"
        if tmp.exists():  # an interrupted build: debootstrap may have left /proc and /sys mounted in it
            unmount_under(tmp)
            shutil.rmtree(tmp)
        cmd = [
            "debootstrap",
            f"--arch={arch}",
            "--variant=minbase",
            f"--include={','.join(root_packages(arch))}",
            SUITE,
            str(tmp),
            MIRROR,
        ]
        log(f"  debootstrap {arch} into {tmp} (a few minutes; cached afterwards)")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            tail = (
                Path(tmp, "debootstrap/debootstrap.log").read_text(errors="replace")[-3000:]
                if Path(tmp, "debootstrap/debootstrap.log").exists()
                else done.stderr[-3000:]
            )
            raise StepFailed(f"debootstrap failed ({done.returncode}): {tail}")
        _prepare_root(tmp)
        (tmp / ".edged-root-ok").write_text(json.dumps({"packages": root_packages(arch), "made": time.time()}))
        tmp.rename(path)
        return path, False


def unmount_under(folder: Path) -> None:
    """Unmount (lazily, deepest first) whatever is mounted inside `folder`, so that deleting it stays inside it."""
    prefix = str(folder.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _prepare_root(root: Path) -> None:
    """Things a container boot wants that debootstrap leaves out; nothing edged-specific (the installer does that)."""
    (root / "etc/hostname").write_text("edged-e2e\n")
    (root / "etc/machine-id").write_text("")  # a fresh id on each boot of each copy
    # Units that only slow a container's boot or wait for hardware it does not have.
    for unit in (
        "systemd-networkd-wait-online.service",
        "console-getty.service",
        "getty@tty1.service",
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
    ):
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)


# -------------------------------------------------------------------------------------------- wheels


def _requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["speed"]]


def ensure_wheelhouse(arch: str, log) -> Path:
    """Wheels (and sdists where no wheel exists) for edged's dependencies on `arch`, cached by pyproject.toml."""
    constraints = installer_list("ARMHF_PIP_CONSTRAINTS") if arch == "armhf" else ()
    key = (REPO / "pyproject.toml").read_bytes() + repr(constraints).encode()
    name = f"systemd-e2e-wheels-{arch}-{hashlib.sha256(key).hexdigest()[:12]}-v2"
    path = CACHE / name
    with locked(name):
        if (path / ".ok").exists():
            return path
        tmp = CACHE / f"{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
        # Build tools for the checkout's own wheel, built by pip inside the container.
        sh([*pip, "download", "-d", str(tmp), "setuptools>=61", "wheel"], env=env)
        if arch == host_arch():
            sh([*pip, "download", "-d", str(tmp), *_requirements()], env=env, timeout=900)
        else:
            # Resolve on the host, then fetch each pinned package for the target; Debian provides some on armhf.
            report = tmp / "report.json"
            (tmp / "constraints.txt").write_text("".join(f"{c}\n" for c in constraints))
            sh(
                [
                    *pip,
                    "install",
                    "--dry-run",
                    "--ignore-installed",
                    "--report",
                    str(report),
                    "-c",
                    str(tmp / "constraints.txt"),
                    *_requirements(),
                ],
                env=env,
                timeout=900,
            )
            pins = [
                (i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]
            ]
            report.unlink()
            (tmp / "constraints.txt").unlink()
            debian = {"pyyaml", "cffi", "uvloop"} if arch == "armhf" else set()
            platforms = [x for p in PIP_PLATFORMS[arch] for x in ("--platform", p)]
            for name_, version in pins:
                if name_.lower() in debian:
                    continue
                got = sh(
                    [
                        *pip,
                        "download",
                        "--no-deps",
                        "--only-binary=:all:",
                        *platforms,
                        "--python-version",
                        "3.11",
                        "--implementation",
                        "cp",
                        "-d",
                        str(tmp),
                        f"{name_}=={version}",
                    ],
                    env=env,
                    check=False,
                )
                if got.returncode != 0:  # no wheel for this arch: the source, compiled by pip in the container
                    log(f"  {arch}: no wheel for {name_} {version}; the installer compiles it")
                    sh(
                        [*pip, "download", "--no-deps", "--no-binary=:all:", "-d", str(tmp), f"{name_}=={version}"],
                        env=env,
                    )
                    # ... with the build tools its pyproject.toml asks for (pure Python: any wheel fits).
                    sdist = next(tmp.glob(f"{name_}-{version}.tar.gz"))
                    with tarfile.open(sdist) as tar:
                        member = tar.extractfile(f"{name_}-{version}/pyproject.toml")
                        build = tomllib.loads(member.read().decode())["build-system"]["requires"] if member else []
                    if build:
                        sh([*pip, "download", "-d", str(tmp), *build], env=env)
        (tmp / ".ok").write_text("")
        tmp.rename(path)
        return path


# ------------------------------------------------------------------------------------------ the container


class Container:
    """A booted systemd-nspawn container on an overlay of a cached root; commands run inside with nsenter."""

    def __init__(self, image: Path, work: Path, arch: str) -> None:
        self.arch = arch
        self.lower = image
        self.upper, self.workdir, self.root = work / "upper", work / "work", work / "root"
        for d in (self.upper, self.workdir, self.root):
            d.mkdir(parents=True, exist_ok=True)
        self.console = work / "console.log"
        self.proc: subprocess.Popen | None = None
        self.pid1 = 0
        self.machine = f"edged-e2e-{os.getpid()}"
        sh(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                _overlay_opts(self.lower, self.upper, self.workdir),
                str(self.root),
            ]
        )

    def boot(self, timeout: float) -> float:
        """Start the container and wait until systemd says running; returns the seconds it took."""
        t0 = time.monotonic()
        cmd = ["systemd-nspawn", "-D", str(self.root), "--boot", "--register=no", "--keep-unit", "--console=pipe"]
        cmd += ["--private-network", f"--machine={self.machine}", "--hostname=edged-e2e"]
        with open(self.console, "ab") as console:  # Popen keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid1 = self._find_pid1(t0 + timeout)
        while True:
            done = self.run(
                ["systemctl", "is-system-running", "--wait"],
                check=False,
                timeout=max(1.0, t0 + timeout - time.monotonic()),
            )
            state = done.stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > t0 + timeout:
                raise StepFailed(f"the container did not finish booting: {state}\n{self.tail_console()}")
            time.sleep(0.2)
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False).stdout.strip()
            print(f"  note: container degraded: {failed}", flush=True)
        return time.monotonic() - t0

    def _find_pid1(self, deadline: float) -> int:
        """The container's init: a descendant of systemd-nspawn that is PID 1 in its own namespace."""
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StepFailed(f"systemd-nspawn exited {self.proc.returncode}\n{self.tail_console()}")
            for pid in _descendants(self.proc.pid):
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{pid}/status").read_text()
                    m = re.search(r"^NSpid:\s+(.*)$", status, re.M)
                    if m and m.group(1).split()[-1] == "1" and len(m.group(1).split()) > 1:
                        return pid
            time.sleep(0.05)
        raise StepFailed(f"the container's init did not appear\n{self.tail_console()}")

    def run(
        self,
        cmd: list[str],
        *,
        user: str | None = None,
        check: bool = True,
        timeout: float = 300,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run `cmd` in the container (all its namespaces, a clean environment: no host PIP_* or proxy)."""
        if user is not None:
            cmd = ["runuser", "-u", user, "--", *cmd]
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        full = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", f"PATH={PATH_INSIDE}", "LANG=C.UTF-8", *extra, *cmd]
        done = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise StepFailed(
                f"{' '.join(cmd)} exited {done.returncode}:\n{(done.stdout + done.stderr).strip()[-3000:]}"
            )
        return done

    def popen(self, cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", f"PATH={PATH_INSIDE}", *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside (through the overlay's merged view; the container sees it at once)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def unit_state(self, unit: str = "edged") -> dict[str, str]:
        return self.show(unit, "ActiveState", "SubState", "ExecMainStatus", "NRestarts", "Result")

    def reboot(self, timeout: float) -> tuple[float, float]:
        """`systemctl reboot` inside; systemd-nspawn ends (exit 133) and is started again on the same overlay.

        Returns (seconds to shut down, seconds to boot).
        """
        t0 = time.monotonic()
        self.run(["systemctl", "reboot"], check=False)
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        if code not in (0, 133):
            raise StepFailed(f"systemd-nspawn exited {code} on reboot\n{self.tail_console()}")
        down = time.monotonic() - t0
        return down, self.boot(timeout - down)

    def shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.run(["systemctl", "poweroff"], check=False, timeout=20)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        for _ in range(20):
            if subprocess.run(["umount", str(self.root)], capture_output=True).returncode == 0:
                break
            if not os.path.ismount(self.root):
                break
            time.sleep(0.5)

    def tail_console(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-n:])
        return ""

    def journal(self, unit: str = "edged", since: str | None = None) -> str:
        cmd = ["journalctl", "-u", unit, "--no-pager", "-o", "cat"]
        if since:
            cmd += ["--since", since]
        return self.run(cmd, check=False).stdout


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


# ----------------------------------------------------------------------------------------------- the steps

BACKEND_UNIT = """[Unit]
Description=A plain HTTP backend for the edged systemd test
[Service]
ExecStart=/usr/bin/python3 -m http.server 8080 --bind 127.0.0.1 --directory /srv/web
DynamicUser=yes
[Install]
WantedBy=multi-user.target
"""

MANIFEST = """service_name = "web"
endpoint_types = ["local"]
[[endpoints]]
type = "local"
url = "http://127.0.0.1:8080"
[health_check]
tcp = true
interval = "1s"
rise = 1
"""

# The browser that sees the daemon's mDNS goodbye: zeroconf from edged's own virtualenv, on 127.0.0.1.
BROWSER = r"""
import sys, threading, time
from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf
zc = Zeroconf(interfaces=["127.0.0.1"])
gone = threading.Event()
def seen(zeroconf, service_type, name, state_change):
    print(f"{state_change.name} {name} {time.monotonic():.3f}", flush=True)
    if state_change is ServiceStateChange.Removed:
        gone.set()
ServiceBrowser(zc, "_hubmesh._tcp.local.", handlers=[seen])
print("browsing", flush=True)
gone.wait(float(sys.argv[1]))  # then exit: a process left behind in the container would slow its shutdown
zc.close()
"""


def test_config(api_port: int = 7700) -> str:
    """The test's edged.toml: mDNS on the container's loopback, manifests from two folders."""
    return f"""# written by scripts/systemd_e2e.py
[node]
name = "e2e"
[api]
listen = "127.0.0.1:{api_port}"
[ingress]
listen = "127.0.0.1:7701"
insecure = true  # no fleet CA in the container: this test is about the install, not peer identity
[mdns]
interfaces = ["127.0.0.1"]
[services]
dirs = ["services.d", "/srv/edged-extra"]
[log]
level = "info"
"""


class Run:
    """Steps with their results and times, and the figures, printed as they happen and summed up at the end."""

    def __init__(self, arch: str) -> None:
        self.arch = arch
        self.rows: list[tuple[str, str, float, str]] = []
        self.figures: dict[str, str] = {}
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        notes: list[str] = []
        t0 = time.monotonic()
        print(f"[{self.arch}] {name} ...", flush=True)
        try:
            yield notes
        except BaseException as exc:
            took = time.monotonic() - t0
            self.rows.append((name, "FAIL", took, str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__))
            print(f"[{self.arch}] {name}: FAIL after {took:.1f}s\n{exc}", flush=True)
            raise
        took = time.monotonic() - t0
        self.rows.append((name, "ok", took, "; ".join(notes)))
        print(f"[{self.arch}] {name}: ok in {took:.1f}s {'; '.join(notes)}", flush=True)

    def figure(self, name: str, value: str) -> None:
        self.figures[name] = value

    def summary(self) -> str:
        lines = [f"systemd e2e on {self.arch}: {time.monotonic() - self.started:.0f} s in all"]
        for name, result, took, note in self.rows:
            lines.append(f"  {name:<12} {result:<4} {took:7.1f}s  {note}")
        for name, value in self.figures.items():
            lines.append(f"  figure: {name} = {value}")
        return "\n".join(lines)


def _ms(start_us: str, end_us: str) -> float:
    return (int(end_us) - int(start_us)) / 1000


def start_to_ready_ms(c: Container) -> float:
    """ExecMainStart -> active (READY=1 for Type=notify), from systemd's own monotonic timestamps."""
    p = c.show("edged", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    return _ms(p["ExecMainStartTimestampMonotonic"], p["ActiveEnterTimestampMonotonic"])


def expect_running(c: Container) -> dict[str, str]:
    p = c.show("edged", "ActiveState", "SubState", "Type", "NRestarts", "MainPID", "StatusText", "Result")
    if (p["ActiveState"], p["SubState"], p["Type"]) != ("active", "running", "notify"):
        raise StepFailed(f"edged is not active (running) as Type=notify: {p}\n{c.journal()[-3000:]}")
    return p


def edged_status(c: Container, user: str | None = None) -> dict:
    out = c.run(["edged", "status", "--json", "--api", "unix:/run/edged/edged.sock"], user=user).stdout
    return json.loads(out)


def install(c: Container, wheels: str, *args: str) -> subprocess.CompletedProcess:
    return c.run(
        ["/usr/src/edged/scripts/install.sh", *args],
        timeout=3600,
        env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": wheels, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )


def copy_checkout(c: Container) -> None:
    """The checkout as it is (uncommitted edits included), without caches and the dev virtualenv."""
    dest = c.root / "usr/src/edged"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(
        REPO,
        dest,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", "build", ".pytest_cache", ".ruff_cache"
        ),
    )


def steps_full(run: Run, c: Container, wheels: str) -> None:
    with run.step("install") as notes:
        out = install(c, wheels)
        expect_running(c)
        ready = start_to_ready_ms(c)
        run.figure("start to READY=1 (install)", f"{ready:.0f} ms")
        mode = c.run(["stat", "-c", "%a %U:%G", "/etc/edged/edged.toml"]).stdout.strip()
        if mode != "640 root:edged":
            raise StepFailed(f"/etc/edged/edged.toml is {mode}, expected 640 root:edged")
        notes.append(f"active (running), start to READY=1 {ready:.0f} ms, config {mode}")
        if "Traceback" in out.stdout + out.stderr:
            raise StepFailed(out.stdout + out.stderr)

    with run.step("again") as notes:
        c.write("/etc/edged/edged.toml", test_config(), 0o644)  # a user's edit, too loose a mode
        install(c, wheels)
        p = expect_running(c)
        mode = c.run(["stat", "-c", "%a %U:%G", "/etc/edged/edged.toml"]).stdout.strip()
        if "written by scripts/systemd_e2e.py" not in c.run(["cat", "/etc/edged/edged.toml"]).stdout:
            raise StepFailed("a second install replaced the user's edged.toml")
        if mode != "640 root:edged":
            raise StepFailed(f"a second install left edged.toml at {mode}")
        notes.append(f"config kept, mode tightened to {mode}, restarts {p['NRestarts']}")

    with run.step("status") as notes:
        c.run(["useradd", "-m", "-G", "edged", "alice"])
        c.run(["useradd", "-m", "bob"])
        data = edged_status(c, "alice")
        if not data["node"]["ready"] or data["node"]["name"] != "e2e":
            raise StepFailed(f"unexpected status {data['node']}")
        denied = c.run(["edged", "status", "--api", "unix:/run/edged/edged.sock"], user="bob", check=False)
        if denied.returncode == 0:
            raise StepFailed("bob (not in group edged) was answered over the Unix socket")
        notes.append(f"alice (group edged) ok; bob refused: {(denied.stderr or denied.stdout).strip()[:80]}")

    with run.step("call") as notes:
        c.write("/srv/web/hello.txt", "hello from the backend\n")
        c.write("/etc/systemd/system/backend.service", BACKEND_UNIT)
        c.run(["systemctl", "daemon-reload"])
        c.run(["systemctl", "enable", "--now", "backend"])
        c.write("/srv/edged-extra/web.toml", MANIFEST)
        wait_for(lambda: "hello from the backend" in _answer(c, "web", "/hello.txt"), 30, 0.2, what="a web answer")
        notes.append("edged call web /hello.txt answered by the backend")

    with run.step("reload") as notes:
        # A manifest change and a config change, both made visible only by the reload: a long watch interval
        # (itself a live key) means the file watcher cannot be the one that picks them up.
        cfg = test_config().replace("[services]", '[services]\nreload_interval = "1h"')
        c.write("/etc/edged/edged.toml", cfg, 0o640)
        c.run(["chgrp", "edged", "/etc/edged/edged.toml"])
        t0 = time.monotonic()
        c.run(["systemctl", "reload", "edged"])
        first = time.monotonic() - t0
        time.sleep(2.5)  # the watcher's last 2 s wait ends: from now on only a reload reads the folders
        c.write("/etc/edged/services.d/web2.toml", MANIFEST.replace('"web"', '"web2"'))
        cfg = cfg.replace('level = "info"', 'level = "debug"').replace("127.0.0.1:7700", "127.0.0.1:7710")
        cfg = cfg.replace("[demo]", "") + "[demo]\necho = true\n"
        c.write("/etc/edged/edged.toml", cfg, 0o640)
        c.run(["chgrp", "edged", "/etc/edged/edged.toml"])
        before = c.show("edged", "MainPID")["MainPID"]
        t0 = time.monotonic()
        c.run(["systemctl", "reload", "edged"])
        took = time.monotonic() - t0
        run.figure("systemctl reload", f"{took * 1000:.0f} ms (first {first * 1000:.0f} ms)")
        if c.show("edged", "MainPID")["MainPID"] != before:
            raise StepFailed("reload restarted the daemon")
        if not _call_ok(c, "web2", "/hello.txt"):
            raise StepFailed("the manifest added before the reload is not routed")
        if not _call_ok(c, "echo", "/x"):
            raise StepFailed("[demo] echo = true (a live key) was not applied by the reload")
        data = edged_status(c, "alice")
        pending = data.get("config", {}).get("pending_restart", [])
        if "api.listen" not in pending:
            raise StepFailed(f"api.listen is not reported as pending restart: {data.get('config')}")
        text = c.run(["edged", "status", "--api", "unix:/run/edged/edged.sock"], user="alice").stdout
        if "pending restart" not in text:
            raise StepFailed(f"`edged status` does not say pending restart:\n{text}")
        if "pending restart" not in c.journal():
            raise StepFailed("the journal does not say pending restart")
        notes.append(f"manifest + demo.echo + log.level applied live; api.listen pending restart; {took * 1000:.0f} ms")

    with run.step("bad reload") as notes:
        c.write("/etc/edged/edged.toml", cfg.replace("[log]", "[log]\nlevel_typo = 1\n"), 0o640)
        c.run(["chgrp", "edged", "/etc/edged/edged.toml"])
        done = c.run(["systemctl", "reload", "edged"], check=False)
        p = expect_running(c)
        if done.returncode == 0:
            raise StepFailed("systemctl reload succeeded with a broken edged.toml")
        if "level_typo" not in p["StatusText"]:
            raise StepFailed(f"STATUS= does not name the error: {p['StatusText']!r}")
        if not _call_ok(c, "web", "/hello.txt"):
            raise StepFailed("the daemon stopped serving after a bad reload")
        notes.append(f"still serving; STATUS={p['StatusText'][:90]!r}")

    with run.step("bad start") as notes:
        c.run(["systemctl", "restart", "edged"], check=False)
        wait_for(lambda: c.unit_state()["ActiveState"] == "failed", 20, 0.2, what="edged to fail")
        p = c.unit_state()
        time.sleep(3)  # RestartSec=2s: a restart loop would have begun by now
        again = c.unit_state()
        if p["ExecMainStatus"] != "78" or again["ActiveState"] != "failed" or again["NRestarts"] != p["NRestarts"]:
            raise StepFailed(f"expected exit 78 and no restart, got {p} then {again}")
        lines = [ln for ln in c.journal().splitlines() if "level_typo" in ln]
        if not lines or "Traceback" in c.journal():
            raise StepFailed(f"the journal should say what is wrong in one line:\n{c.journal()[-2000:]}")
        notes.append(f"exit 78, no restart loop; journal: {lines[-1][:100]!r}")
        c.write("/etc/edged/edged.toml", cfg.replace("127.0.0.1:7710", "127.0.0.1:7700"), 0o640)
        c.run(["chgrp", "edged", "/etc/edged/edged.toml"])
        c.run(["systemctl", "reset-failed", "edged"])

    with run.step("watchdog") as notes:
        c.write("/etc/systemd/system/edged.service.d/watchdog.conf", "[Service]\nWatchdogSec=3s\n")
        c.run(["systemctl", "daemon-reload"])
        c.run(["systemctl", "start", "edged"])
        t0 = time.monotonic()
        c.run(["systemctl", "restart", "edged"])
        run.figure("systemctl restart", f"{(time.monotonic() - t0) * 1000:.0f} ms")
        ready = start_to_ready_ms(c)
        run.figure("start to READY=1 (restart)", f"{ready:.0f} ms")
        p = expect_running(c)
        c.run(["systemctl", "kill", "--signal=SIGSTOP", "edged"])
        t0 = time.monotonic()

        def restarted() -> bool:
            s = c.unit_state()
            return s["NRestarts"] != p["NRestarts"] and (s["ActiveState"], s["SubState"]) == ("active", "running")

        wait_for(restarted, 60, 0.1, what="a watchdog restart")
        took = time.monotonic() - t0
        run.figure("SIGSTOP to running again (WatchdogSec=3s)", f"{took:.1f} s")
        if "watchdog timeout" not in c.journal().lower():
            raise StepFailed("no watchdog timeout in the journal")
        if not _call_ok(c, "web", "/hello.txt"):
            raise StepFailed("no answer after the watchdog restart")
        notes.append(
            f"watchdog timeout -> restarted and serving {took:.1f}s after SIGSTOP; start to READY {ready:.0f} ms"
        )

    with run.step("stop") as notes:
        browser = c.popen(["/opt/edged/bin/python", "-c", BROWSER, "30"])
        lines: list[str] = []
        _read_until(browser, lines, lambda line: line.startswith("Added"), 20)
        t0 = time.monotonic()
        c.run(["systemctl", "stop", "edged"])
        took = time.monotonic() - t0
        run.figure("systemctl stop", f"{took * 1000:.0f} ms")
        _read_until(browser, lines, lambda line: line.startswith("Removed"), 10)
        browser.wait(timeout=20)  # it exits once it has seen the goodbye
        p = c.show("edged", "ActiveState", "ExecMainStatus", "Result")
        if p["ExecMainStatus"] != "0" or p["Result"] != "success" or p["ActiveState"] != "inactive":
            raise StepFailed(f"stop did not end cleanly: {p}")
        if "mdns.goodbye" not in c.journal():
            raise StepFailed("no mdns.goodbye in the journal")
        notes.append(f"exit 0 in {took * 1000:.0f} ms; the browser saw: {[ln.rsplit(' ', 1)[0] for ln in lines]}")

    with run.step("reboot") as notes:
        t0 = time.monotonic()
        down, up = c.reboot(120)
        notes.append(f"container down in {down:.1f}s, up in {up:.1f}s")
        wait_for(lambda: c.unit_state()["ActiveState"] == "active", 60, 0.1, what="edged after the reboot")
        active = time.monotonic() - t0
        wait_for(lambda: _call_ok(c, "web", "/hello.txt"), 30, 0.2, what="an answer after the reboot")
        took = time.monotonic() - t0
        ready = start_to_ready_ms(c)
        run.figure("start to READY=1 (boot)", f"{ready:.0f} ms")
        notes.append(f"active {active:.1f}s, serving {took:.1f}s after `systemctl reboot`; READY {ready:.0f} ms")

    with run.step("security") as notes:
        out = c.run(["systemd-analyze", "security", "edged"], check=False).stdout
        m = re.search(r"Overall exposure level for edged\.service: (\d+\.\d+)", out)
        if not m:
            raise StepFailed(out[-2000:])
        score = float(m.group(1))
        run.figure("systemd-analyze security edged", f"{score}")
        if score > 2.0:
            raise StepFailed(f"exposure {score} > 2.0:\n{out}")
        notes.append(f"exposure {score}")

    with run.step("uninstall") as notes:
        install(c, wheels, "--uninstall")
        gone = c.run(
            [
                "sh",
                "-c",
                "test ! -e /etc/systemd/system/edged.service && test ! -e /opt/edged "
                "&& test ! -e /usr/local/bin/edged && test -f /etc/edged/edged.toml",
            ],
            check=False,
        )
        if gone.returncode != 0:
            raise StepFailed("uninstall left the unit or program behind, or removed the config")
        notes.append("unit, venv and link gone; /etc/edged kept")


# QEMU user emulation cannot set up a user namespace for a unit (PrivateUsers=yes fails with EINVAL at step
# USER); every other setting of the unit works there. A real ARM box's kernel has no such limit.
QEMU_DROPIN = (
    "[Service]\n# QEMU user emulation only (scripts/systemd_e2e.py): no user namespaces there\nPrivateUsers=no\n"
)


def steps_arm(run: Run, c: Container, wheels: str) -> None:
    with run.step("install") as notes:
        install(c, wheels, "--no-start")
        c.write("/etc/systemd/system/edged.service.d/qemu-user.conf", QEMU_DROPIN)
        c.run(["systemctl", "daemon-reload"])
        c.run(["systemctl", "start", "edged"], timeout=300)
        expect_running(c)
        ready = start_to_ready_ms(c)
        run.figure("start to READY=1", f"{ready:.0f} ms")
        notes.append(f"active (running), start to READY=1 {ready:.0f} ms")
    with run.step("call") as notes:
        c.write("/srv/web/hello.txt", "hello from the backend\n")
        c.write("/etc/systemd/system/backend.service", BACKEND_UNIT)
        c.write("/etc/edged/services.d/web.toml", MANIFEST)
        c.run(["systemctl", "daemon-reload"])
        c.run(["systemctl", "enable", "--now", "backend"])
        c.run(["systemctl", "reload", "edged"], timeout=120)
        wait_for(lambda: _call_ok(c, "web", "/hello.txt"), 120, 1.0, what="the web service through the mesh")
        notes.append("edged call web /hello.txt answered by the backend")
    with run.step("stop") as notes:
        t0 = time.monotonic()
        c.run(["systemctl", "stop", "edged"], timeout=120)
        took = time.monotonic() - t0
        p = c.show("edged", "ExecMainStatus", "Result")
        if p["ExecMainStatus"] != "0" or p["Result"] != "success":
            raise StepFailed(f"stop did not end cleanly: {p}")
        run.figure("systemctl stop", f"{took * 1000:.0f} ms")
        notes.append(f"exit 0 in {took * 1000:.0f} ms")


def _answer(c: Container, service: str, path: str) -> str:
    """The answer of a call through the mesh, "" when the call failed."""
    done = c.run(["edged", "call", service, path, "--api", "unix:/run/edged/edged.sock"], check=False, timeout=60)
    return done.stdout if done.returncode == 0 else ""


def _call_ok(c: Container, service: str, path: str) -> bool:
    return bool(_answer(c, service, path))


def _read_until(proc: subprocess.Popen, lines: list[str], want, timeout: float) -> str:
    """Lines from a child's stdout until one satisfies `want` (os.read + select: no blocked readline)."""
    import select

    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if want(line.strip()):
                return line
    raise StepFailed(f"the mDNS browser did not report it in {timeout:g}s: {lines}")


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=None, help="amd64 (default: this machine's), arm64 or armhf")
    p.add_argument("--keep", action="store_true", help="leave the container's overlay for a look afterwards")
    args = p.parse_args()
    arch = args.arch or host_arch()
    run = Run(arch)
    try:
        check_machine(arch)
    except Skip as why:
        print(f"systemd e2e: SKIPPED on {arch}: {why}", flush=True)
        return SKIP
    boot_timeout = 60 if arch == host_arch() else 300
    work = Path(tempfile.mkdtemp(prefix=f"edged-e2e-{arch}-", dir="/var/tmp"))
    container = None
    ok = False
    try:
        with run.step("root") as notes:
            image, cached = ensure_root(arch, print)
            notes.append(f"{image.name} ({'cached' if cached else 'made now'})")
        with run.step("wheels") as notes:
            wheels = ensure_wheelhouse(arch, print)
            notes.append(f"{len(list(wheels.iterdir()))} files in {wheels.name}")
        with run.step("boot") as notes:
            container = Container(image, work, arch)
            copy_checkout(container)
            shutil.copytree(wheels, container.root / "var/tmp/wheels")
            took = container.boot(boot_timeout)
            run.figure("container boot to running", f"{took:.1f} s")
            notes.append(f"systemd running in {took:.1f}s")
        (steps_full if arch == host_arch() else steps_arm)(run, container, "/var/tmp/wheels")
        ok = True
    except (StepFailed, AssertionError, subprocess.TimeoutExpired) as exc:
        if container is not None:
            print("--- edged journal (tail) ---\n" + "\n".join(container.journal().splitlines()[-40:]), flush=True)
        print(f"systemd e2e: {exc}", file=sys.stderr)
    finally:
        if container is not None:
            container.shutdown()
        if not args.keep:
            unmount_under(work)  # never delete through a still-mounted overlay
            shutil.rmtree(work, ignore_errors=True)
        print(run.summary(), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
