"""The processes of a local Ray instance, read from /proc and named by PID and start time, and
the watch on them from outside the driver. Ray's core worker ends the driver at once, with exit
1 and not a word, when its raylet goes, as the raylet does when one of its agents dies: nothing
in the driver runs after that. So ray_engine starts this file as a second process, given the
instance's own processes (what ray.init() started), which outlives the driver. It follows their
descendants; told "stopped" once the driver has shut the instance down, it ends what is left.
If the driver ends without a word, it names the process that died first, ends what is left and
prints how to resume.

Imported by ray_engine (children, runs_from, process_start, process_title, exit_status, hasten,
DIED) and run by it as a script; it imports only the standard library, so that it starts in
milliseconds."""

import contextlib
import itertools
import os
import select
import signal
import sys
import time
from pathlib import Path

DIED = "the local Ray instance stopped under the script: its {} process died"


def stat_fields(pid):
    """/proc/PID/stat's fields after the process's name, from its state on; [] once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_start(pid):
    """A process's start time (clock ticks after boot): with its PID, it names one process for
    good, where the PID alone may be reused. None once it has ended (a zombie has)."""
    fields = stat_fields(pid)
    if len(fields) < 20 or fields[0] in "ZX":
        return None
    return int(fields[19])


def exit_status(pid):
    """The exit status, as waitpid() gives it, of a child that has ended and not yet been reaped
    (its zombie keeps it in /proc/PID/stat); None while it runs or once it is reaped."""
    fields = stat_fields(pid)
    return int(fields[49]) if fields[:1] == ["Z"] and len(fields) > 49 else None


def children_by_parent():
    children = {}
    for proc in Path("/proc").glob("[0-9]*"):
        fields = stat_fields(int(proc.name))
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(proc.name))
    return children


def children(parent):
    return children_by_parent().get(parent, [])


def command_line(pid):
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def runs_from(pid, folder):
    """Whether the process runs a program, or a script, from `folder`."""
    with contextlib.suppress(OSError):
        return any(arg.startswith(folder + os.sep) for arg in command_line(pid)[:3])
    return False


def process_title(pid):
    """What Ray calls a process: its title (ray::RuntimeEnvAgent -> RuntimeEnvAgent), the program
    it runs (raylet, gcs_server), or for Python the script (log_monitor)."""
    argv = command_line(pid)
    program = os.path.basename(argv[0].removeprefix("ray::"))
    scripts = [arg for arg in argv[1:] if arg.endswith(".py")]
    return Path(scripts[0]).stem if program.startswith("python") and scripts else program


def family(roots, seen):
    """Adds to `seen` (PID -> (start time, title)) the live processes of `roots` and their
    descendants."""
    children = children_by_parent()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        start = process_start(pid)
        if start is not None and seen.get(pid, (None,))[0] != start:
            with contextlib.suppress(OSError, IndexError):
                seen[pid] = (start, process_title(pid))
        todo += children.get(pid, [])


def end(seen):
    """SIGKILL each process seen that is still that very process: a pidfd is opened first, then
    its start time checked, so the signal cannot reach a process that took over a freed PID."""
    for pid, (start, _) in seen.items():
        with contextlib.suppress(OSError):
            handle = os.pidfd_open(pid)
            try:
                if process_start(pid) == start:
                    signal.pidfd_send_signal(handle, signal.SIGKILL)
            finally:
                os.close(handle)


def sigterm_pending(pid):
    with contextlib.suppress(OSError, IndexError):
        pending = Path(f"/proc/{pid}/status").read_text().split("ShdPnd:")[1].split()[0]
        return bool(int(pending, 16) & 1 << (signal.SIGTERM - 1))
    return False


def hasten(own, stopped):
    """Until the event `stopped`: SIGKILL each of the instance's own processes once it has a
    SIGTERM pending. They block SIGTERM (ray_engine), so ray.shutdown()'s SIGTERM would only
    wait out a grace of a second per process before its SIGKILL."""
    while not stopped.wait(0.01):
        for pid, (start, _) in own.items():
            if sigterm_pending(pid) and process_start(pid) == start:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def is_agent(title):
    """One of the raylet's agents: its death takes the raylet with it."""
    return title.endswith("Agent")


def watch(ending, roots):
    """Checks the instance ten times a second until stdin says "stopped" (the driver shut the
    instance down) or ends (the driver is gone). A death of one of the instance's own processes
    (not a worker: Ray replaces those) counts once the driver is seen alive after it, as the
    driver's own end takes the raylet with it."""
    # a Ctrl-C or SIGTERM is the driver's to handle; this waits for its end
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    driver = os.getppid()
    driver_start = process_start(driver)
    seen = {}
    gone = []
    for looks in itertools.count():
        if looks % 10 == 0:  # new workers, once a second: a look reads all of /proc
            family(roots, seen)
        if select.select([0], [], [], 0.1)[0]:
            break
        dead = [title for pid, (start, title) in seen.items()
                if (pid in roots or is_agent(title)) and title not in gone
                and process_start(pid) != start]
        if process_start(driver) == driver_start:
            gone += dead
    if os.read(0, 64):  # "stopped"
        end(seen)
        return 0
    # The driver ended without stopping its instance: its end kills the raylet and gcs_server
    # within milliseconds (they share its fate), its agents only seconds later. So an agent
    # dead now died first.
    gone += [title for pid, (start, title) in seen.items()
             if is_agent(title) and title not in gone and process_start(pid) != start]
    time.sleep(0.2)  # what its end takes with it ends too
    family(list(seen), seen)  # workers started since the last look
    end(seen)
    agents = [title for title in gone if is_agent(title)]
    what = (DIED.format((agents or gone)[0]) if gone else
            f"the script (PID {driver}) was ended from outside; its local Ray instance is stopped")
    print(f"error: {what}; {ending}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(watch(sys.argv[1], [int(pid) for pid in sys.argv[2:]]))
