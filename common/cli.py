"""How scripts fail on bad input: one line naming the problem and the fix, exit status 2."""
import sys


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
