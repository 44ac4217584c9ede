"""How scripts talk to the user: bad input fails in one line (exit status 2), progress is shown on a
terminal as bars and elsewhere (a log file, a pipe) as a plain line at a modest interval."""
import sys

from tqdm.auto import tqdm


class UserError(Exception):
    """Bad input from the user (config, data, run directory, checkpoint). Printed as one line."""


def run(main):
    """Run `main(argv)` as a command: UserError -> one line on stderr and exit status 2."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        sys.exit(130)


class _Lines:
    """A file for tqdm that turns its redrawn line into one plain line per refresh (for logs)."""

    last = ""

    def write(self, text):
        text = text.replace("\r", "").strip()
        if text and text != self.last:  # the closing refresh repeats the last line
            print(text, file=sys.stderr, flush=True)
            self.last = text

    def flush(self):
        pass


def progress(iterable=None, every=30, disable=False, **kwargs):
    """tqdm(iterable, **kwargs) on a terminal; when stderr is not one, a line like 'examples: 40/100 (40%)
    00:30 elapsed, ~00:45 left' every `every` seconds, the first after `every` seconds (a short loop
    prints nothing; a long one a line at the end too, unless leave=False)."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, disable=disable, **kwargs)
    total = kwargs.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
    fmt = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) {elapsed} elapsed, ~{remaining} left" if total \
        else "{desc}: {n_fmt} {elapsed} elapsed"
    return tqdm(iterable, file=_Lines(), delay=every, mininterval=every, maxinterval=max(every, 10), bar_format=fmt,
                **kwargs)
