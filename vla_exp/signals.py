"""A run asked to stop (Ctrl-C, SIGTERM from SLURM or a shell, SIGUSR1/SIGUSR2 from SLURM or submitit before a
time limit or a preemption) stops at the next step boundary: it writes a checkpoint and a summary that says
`interrupted`, finishes W&B, and only then exits, so nothing it finished is lost and the same command resumes it.

A handler installed before the run (submitit's, which requeues the job on its preemption signal) is handed the
signal after that (`Interrupted.hand_on`), so the job is requeued and the requeued job resumes from the checkpoint.
A second Ctrl-C stops at once.
"""
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Interrupted(Exception):
    """A run that stopped on a signal after saving what it had; the command line prints its message alone."""
    def __init__(self, signum, message, handler=None):
        super().__init__(message)
        self.signum, self.handler = signum, handler

    def hand_on(self):
        """Call the handler that was installed before the run for this signal (submitit's requeue), if any."""
        if self.handler:
            self.handler(self.signum, None)


class StopOnSignal:
    """While active, the signals above set `signum` instead of ending the process."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self.previous = {s: signal.signal(s, self.ask) for s in SIGNALS}
        return self

    def ask(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def interrupted(self, message):
        """The exception that ends the run, carrying the handler that was there before (none for Python's own
        Ctrl-C handler, or where there was none)."""
        handler = self.previous.get(self.signum)
        callable_ = callable(handler) and handler is not signal.default_int_handler
        return Interrupted(self.signum, message, handler if callable_ else None)
