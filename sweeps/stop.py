"""Ctrl-C and SIGTERM stop a sweep whenever they arrive, and the finished runs stay. Imported by
runs, the engines and cli; it imports only the standard library."""

import contextlib
import signal


class StopSignal:
    """Ctrl-C (SIGINT) and SIGTERM stop the sweep whenever they arrive. The handler raises
    KeyboardInterrupt and remembers the signal: code that swallows exceptions may meet it first
    (the garbage collector runs Lightning's Profiler.__del__, which drops what is raised in it),
    and check(), called between runs, raises it again."""

    received = None  # the signal's number, once one came
    deferring = False

    @classmethod
    def handle(cls, signum, frame):
        cls.received = signum
        if not cls.deferring:
            raise KeyboardInterrupt

    @classmethod
    @contextlib.contextmanager
    def deferred(cls, then_stop=True):
        """A signal that arrives in here stops the sweep at the end of the block (around
        gc.collect(): an exception raised in a __del__ is printed as 'Exception ignored' and
        dropped), or, then_stop=False, is only remembered (the clean-up after a first signal)."""
        cls.deferring = True
        try:
            yield
        finally:
            cls.deferring = False
        if then_stop:
            cls.check()

    @classmethod
    def install(cls):
        """Also after ray.init(), which sets a SIGTERM handler of its own. A SIGINT ignored from
        the start (a job in the background of a script) stays ignored."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN or signum == signal.SIGTERM:
                signal.signal(signum, cls.handle)

    @classmethod
    def check(cls):
        if cls.received is not None:
            raise KeyboardInterrupt
