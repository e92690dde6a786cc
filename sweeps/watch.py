"""The processes of a local Ray instance, named by PID and start time, and the watch on them from
outside the driver. Ray's core worker ends the driver at once, with exit 1 and not a word, when
its raylet goes, as the raylet does when one of its agents dies: nothing in the driver runs
after that. So ray_engine starts this file as a second process that outlives the driver; the
driver tells it the instance's processes as it sees them, and "done" when it has stopped the
instance itself. If the driver ends without "done", the watch names the process that died first,
stops what the instance left running and prints how to resume.

Imported by ray_engine (process_start, children, runs_from, exit_status, asked_to_stop, family,
is_agent, end) and run by it as a script; it imports only the standard library, so that it
starts in milliseconds."""

import contextlib
import json
import os
import select
import signal
import sys
import time
from pathlib import Path


def process_start(pid: int) -> int | None:
    """A process's start time (clock ticks after boot, /proc/PID/stat): with its PID, it names one
    process for good, where the PID alone may be reused. None once it is gone (or off Linux)."""
    fields = stat_fields(pid)
    if len(fields) < 20 or fields[0] in "ZX":  # a zombie has ended
        return None
    return int(fields[19])


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the process's name, from its state on; [] once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from /proc: parent PID -> child PIDs."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        fields = stat_fields(int(proc.name))
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(proc.name))
    return children


def children(parent: int) -> list[int]:
    """The processes whose parent is `parent`: ray_engine takes those
    that ray.init() started as the instance's own."""
    return children_by_parent().get(parent, [])


def command_line(pid: int) -> list[str]:
    """The process's arguments, its program first (Ray's title for its own)."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def runs_from(pid: int, folder: str) -> bool:
    """Whether the process runs a program, or a script, from `folder`."""
    with contextlib.suppress(OSError):
        return any(arg.startswith(folder + os.sep) for arg in command_line(pid)[:3])
    return False


def exit_status(pid: int) -> int | None:
    """The exit status, as waitpid() gives it, of a child that has ended and not yet been reaped
    (its zombie keeps it in /proc/PID/stat); None while it runs or once it is reaped."""
    fields = stat_fields(pid)
    return int(fields[49]) if fields[:1] == ["Z"] and len(fields) > 49 else None


def asked_to_stop(pid: int) -> bool:
    """Whether a process has a SIGTERM pending: sent to it while it blocks the signal."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        pending = next(line for line in lines if line.startswith("ShdPnd:")).split()[1]
        return bool(int(pending, 16) & 1 << (signal.SIGTERM - 1))
    return False


def family(roots: list[int], seen: dict[str, list]) -> None:
    """Adds to `seen` (PID -> [start time, title]) the processes of `roots` that are alive and
    their descendants, each with its start time and the title Ray gave it (ray::RuntimeEnvAgent
    -> RuntimeEnvAgent)."""
    children = children_by_parent()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        start = process_start(pid)
        if start is not None and seen.get(str(pid), (None,))[0] != start:
            with contextlib.suppress(OSError, IndexError):
                seen[str(pid)] = [start, process_title(pid)]
        todo += children.get(pid, [])


def process_title(pid: int) -> str:
    """What Ray calls a process: its title (ray::RuntimeEnvAgent -> RuntimeEnvAgent), the program
    it runs (raylet, gcs_server), or for Python the script (log_monitor)."""
    argv = command_line(pid)
    program = os.path.basename(argv[0].removeprefix("ray::"))
    scripts = [arg for arg in argv[1:] if arg.endswith(".py")]
    return Path(scripts[0]).stem if program.startswith("python") and scripts else program


def end(seen: dict[str, list]) -> None:
    """SIGKILL each process seen that is still that very process: a pidfd is opened first, then its
    start time checked, so the signal cannot reach a process that took over a freed PID."""
    for pid, (start, _) in list(seen.items()):
        pid = int(pid)
        with contextlib.suppress(OSError):
            # not Linux 5.3+: the start time just before the signal
            if not hasattr(os, "pidfd_open"):
                if process_start(pid) == start:
                    os.kill(pid, signal.SIGKILL)
                continue
            handle = os.pidfd_open(pid)
            try:
                if process_start(pid) == start:
                    signal.pidfd_send_signal(handle, signal.SIGKILL)
            finally:
                os.close(handle)


def is_agent(title: str) -> bool:
    """One of the raylet's agents (RuntimeEnvAgent, DashboardAgent): its death takes the raylet
    with it."""
    return title.endswith("Agent")


def is_own(title: str, roots: list[int], pid: str) -> bool:
    """One of the instance's own processes (the ones Ray started and its agents), not a worker,
    which Ray replaces when it dies."""
    return int(pid) in roots or is_agent(title)


def watch() -> int:
    """Reads the driver's messages on stdin, one JSON object a line: {"roots", "seen", "ending"} as
    the driver looks, {"done": true} when it has stopped the instance. Checks the instance's own
    processes ten times a second, so that the first to die is known when the driver goes: a
    death counts once the driver is seen alive after it, as the driver's own end takes the
    raylet with it."""
    # a Ctrl-C is the driver's to handle; this waits for its end
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    driver, roots, seen, ending, gone, received = os.getppid(), [], {}, "", [], b""
    driver_start = process_start(driver)
    while True:
        if select.select([0], [], [], 0.1)[0]:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                break
            *lines, received = (received + chunk).split(b"\n")
            for message in map(json.loads, lines):
                if message.get("done"):
                    return 0
                roots, ending = message["roots"], message["ending"]
                seen.update(message["seen"])
        dead = [
            title
            for pid, (start, title) in seen.items()
            if is_own(title, roots, pid) and title not in gone and process_start(int(pid)) != start
        ]
        # the driver outlived them: their deaths came first
        if process_start(driver) == driver_start:
            gone += dead
    # the driver ended without stopping its instance; its end kills the raylet and gcs_server
    # within milliseconds (they share its fate), its agents only seconds later. So an agent dead
    # now died first.
    gone += [title for pid, (start, title) in seen.items()
             if is_agent(title) and title not in gone and process_start(int(pid)) != start]
    time.sleep(0.2)  # what its end takes with it ends too
    family([int(pid) for pid in seen], seen)  # workers started since the driver last looked
    end(seen)
    agents = [title for title in gone if is_agent(title)]
    what = (
        f"the local Ray instance stopped under the script: its {(agents or gone)[0]} process died"
        if gone
        else f"the script (PID {driver}) was ended from outside; its local Ray instance is stopped"
    )
    print(f"error: {what}; {ending}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(watch())
