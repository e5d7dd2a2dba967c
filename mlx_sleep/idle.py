"""Is the machine idle? The question `mlx-sleep consolidate --when-idle` asks before and during
a sleep (it yields between passes as soon as the answer turns to no).

    source = idle_source("auto")       # macOS: input + power + thermal; elsewhere: load average
    idle, why = source()               # (True, "no input for 312 s, on AC power") ...

  mac        no keyboard/mouse input for `idle_seconds` (CoreGraphics
             CGEventSourceSecondsSinceLastEventType through ctypes), on AC power and not
             thermally throttled (`pmset -g batt`, `pmset -g therm`)
  load       the 1-minute load average per CPU core is below `max_load` (Linux, others)
  file:PATH  idle while PATH holds "idle" (tests and scripts drive this one)
"""

import ctypes
import ctypes.util
import os
import subprocess
import sys
from typing import Callable, Tuple

IdleSource = Callable[[], Tuple[bool, str]]


def seconds_since_input() -> float:
    """macOS: seconds since the last keyboard/mouse/trackpad event in this login session."""
    lib = ctypes.cdll.LoadLibrary(
        ctypes.util.find_library("ApplicationServices")
        or "/System/Library/Frameworks/ApplicationServices.framework/ApplicationServices"
    )
    fn = lib.CGEventSourceSecondsSinceLastEventType
    fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_int32, ctypes.c_uint32]
    combined_session_state, any_input_event = 0, 0xFFFFFFFF  # kCGAnyInputEventType = ~0
    return float(fn(combined_session_state, any_input_event))


def _pmset(*args) -> str:
    try:
        return subprocess.run(["pmset", *args], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def on_ac_power(batt: str) -> bool:
    """From `pmset -g batt`: "Now drawing from 'AC Power'" (desktops report AC too)."""
    return "AC Power" in batt or ("Battery Power" not in batt)


def thermally_throttled(therm: str) -> bool:
    """From `pmset -g therm`: a CPU_Speed_Limit below 100, or a thermal warning recorded."""
    for line in therm.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "CPU_Speed_Limit" and value.strip().isdigit() and int(value) < 100:
            return True
    return "warning level" in therm and "No thermal warning level" not in therm


def mac_source(idle_seconds: float = 300) -> IdleSource:
    def idle():
        quiet = seconds_since_input()
        if quiet < idle_seconds:
            return False, f"input {quiet:.0f} s ago (waiting for {idle_seconds:.0f} s)"
        if not on_ac_power(_pmset("-g", "batt")):
            return False, "on battery"
        if thermally_throttled(_pmset("-g", "therm")):
            return False, "thermally throttled"
        return True, f"no input for {quiet:.0f} s, on AC power"

    return idle


def load_source(max_load: float = 0.3) -> IdleSource:
    def idle():
        per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
        if per_core >= max_load:
            return False, f"load {per_core:.2f} per core (waiting for < {max_load})"
        return True, f"load {per_core:.2f} per core"

    return idle


def file_source(path: str) -> IdleSource:
    def idle():
        try:
            with open(path) as f:
                word = f.read().strip()
        except OSError:
            word = ""
        return word == "idle", f"{path} says {word or 'nothing'}"

    return idle


def idle_source(spec: str = "auto", idle_seconds: float = 300, max_load: float = 0.3) -> IdleSource:
    """The idle source named by `spec`: auto, mac, load or file:PATH."""
    if spec.startswith("file:"):
        return file_source(spec[5:])
    if spec == "auto":
        spec = "mac" if sys.platform == "darwin" else "load"
    if spec == "mac":
        return mac_source(idle_seconds)
    if spec == "load":
        return load_source(max_load)
    raise ValueError(f"unknown idle source {spec!r}: use auto, mac, load or file:PATH")


# -- running `consolidate --when-idle` periodically --------------------------------------------

LABEL = "com.mlx-sleep.consolidate"


# Environment variables that decide which sessions a scheduled run sees: the job runs outside
# the user's shell, so they are written into the unit or agent as they are when it is installed.
CARRIED_ENVIRONMENT = ("MLX_SLEEP_HOME", "HF_HOME", "HF_HUB_CACHE")


def carried_environment(environ=None) -> dict:
    """The CARRIED_ENVIRONMENT variables set in `environ` (default: this process), paths made
    absolute: the scheduled job's working directory is not the user's."""
    environ = os.environ if environ is None else environ
    return {
        k: os.path.abspath(os.path.expanduser(environ[k]))
        for k in CARRIED_ENVIRONMENT
        if environ.get(k)
    }


def launchd_plist(command, interval: int = 1800, env=None) -> bytes:
    """A launchd agent that runs `command` every `interval` seconds as a background process
    (low CPU and I/O priority), with `env` (default: carried_environment())."""
    import plistlib

    log = os.path.expanduser("~/Library/Logs/mlx-sleep-consolidate.log")
    agent = {
        "Label": LABEL,
        "ProgramArguments": list(command),
        "StartInterval": int(interval),
        "ProcessType": "Background",
        "LowPriorityIO": True,
        "Nice": 10,
        "RunAtLoad": False,
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }
    env = carried_environment() if env is None else env
    if env:
        agent["EnvironmentVariables"] = dict(env)
    return plistlib.dumps(agent)


def launchd_path() -> str:
    return os.path.expanduser(f"~/Library/LaunchAgents/{LABEL}.plist")


def _agent_label(path):
    """The Label of the launchd agent at `path` (None if it is not a readable plist)."""
    import plistlib
    from xml.parsers.expat import ExpatError

    try:
        with open(path, "rb") as f:
            return plistlib.load(f).get("Label")
    except (OSError, ValueError, ExpatError, AttributeError):
        return None


def install_launchd_agent(command, interval: int, env=None):
    """Write our agent (replacing only our own) and load it: (its path, a warning or None)."""
    from .io import OutputError, atomic_path

    path = launchd_path()
    if os.path.exists(path) and _agent_label(path) != LABEL:
        raise OutputError(
            f"{path} exists and was not written by mlx-sleep; leaving it (move it "
            "away to install ours)"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path, 0o644) as tmp:
        with open(tmp, "wb") as f:
            f.write(launchd_plist(command, interval, env))
    domain = f"gui/{os.getuid()}"
    subprocess.run(["launchctl", "bootout", domain, path], capture_output=True)
    loaded = subprocess.run(
        ["launchctl", "bootstrap", domain, path], capture_output=True, text=True
    )
    if loaded.returncode != 0:
        return path, (
            f"launchctl bootstrap failed ({loaded.stderr.strip()}); it loads at the "
            f"next login, or run: launchctl bootstrap gui/$(id -u) {path}"
        )
    return path, None


def remove_launchd_agent() -> str:
    """Unload and delete the agent install_launchd_agent wrote (never another one)."""
    from .io import OutputError

    path = launchd_path()
    if not os.path.exists(path):
        raise OutputError(f"no agent at {path}: nothing to remove")
    if _agent_label(path) != LABEL:
        raise OutputError(f"{path} was not written by mlx-sleep; leaving it")
    subprocess.run(["launchctl", "bootout", f"gui/{os.getuid()}", path], capture_output=True)
    os.remove(path)
    return path


def systemd_units(command, interval: int = 1800, env=None) -> str:
    """The equivalent systemd user service + timer (printed, for the user to install), with
    `env` (default: carried_environment())."""
    exec_line = " ".join(_systemd_word(c) for c in command)
    env = carried_environment() if env is None else env
    environment = "".join(f"Environment={_systemd_word(f'{k}={v}')}\n" for k, v in env.items())
    return f"""# ~/.config/systemd/user/mlx-sleep-consolidate.service
[Unit]
Description=mlx-sleep: consolidate chat sessions while the machine is idle

[Service]
Type=oneshot
ExecStart={exec_line}
Nice=10
IOSchedulingClass=idle
CPUSchedulingPolicy=batch
{environment}
# ~/.config/systemd/user/mlx-sleep-consolidate.timer
[Unit]
Description=mlx-sleep: run the idle consolidation every {interval} s

[Timer]
OnBootSec={interval}s
OnUnitActiveSec={interval}s

[Install]
WantedBy=timers.target

# then: systemctl --user daemon-reload && systemctl --user enable --now mlx-sleep-consolidate.timer
"""


def _systemd_word(s: str) -> str:
    """`s` as one word of a systemd unit line: as it is when plain, else double-quoted with
    backslash, quote, `%` (specifiers) and `$` (variables) escaped."""
    if s and all(c.isalnum() or c in "_./:=,+-@" for c in s):
        return s
    escaped = s.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'
