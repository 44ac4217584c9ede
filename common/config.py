"""Configuration: the constants at the top of a script, overridden by config files and --key=value.

    python script.py [configs/preset.py ...] [--key=value ...]

A script captures its knobs with `KNOBS = config.knobs(globals())` right after defining them, and its
`main(argv)` calls `cfg = config.parse(KNOBS, argv)`. Values on the command line are Python literals
(`--lr=0.1`, `--rewind_epochs=[0,5]`; a bare word is a string for string keys). A config file is
Python that the user chose to run (like a script): its lowercase top-level constants are taken; keys
another script uses but this one does not are ignored, so one preset serves all five scripts.
Every value is type-checked against the default and validated by the module that defines it.
"""
import ast
import os
import runpy
from types import SimpleNamespace

from .cli import UserError

LITERAL_TYPES = (bool, int, float, str, list, tuple, type(None))

# The shared knob block that opens every script (declared there with `run_knobs`) is the one
# definition of a run's keys. These of them say where and how it executes, not what it is.
NOT_IDENTITY = ("device", "runs_dir", "download", "overwrite", "deterministic", "groups")
RUN_DEFAULTS = {}  # the shared block's keys and defaults, filled by run_knobs


# key -> [(check(value, cfg) -> error text or None)], registered by the module that defines the key.
_CHECKS = {}
# key -> types it takes beside its default's (a str default that also takes a list where its docs say so).
_ALSO = {}


def register_check(key, check):
    """Register `check(value, cfg)` returning None when valid or the error text (problem and fix)."""
    _CHECKS.setdefault(key, []).append(check)


def also_accepts(key, *types):
    """Let `key` take values of `types` besides its default's type, e.g. also_accepts("dropout_after", list)
    for a default "auto"; its registered checks then validate the value."""
    _ALSO[key] = _ALSO.get(key, ()) + types + ((tuple,) if list in types else ())  # one kind, as below


def range_check(key, lo, hi, lo_open=False, hi_open=False):
    """Register a numeric interval check, e.g. range_check('noise', 0, 1, hi_open=True) for [0, 1)."""
    def check(v, cfg):
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = hi is None or (v < hi if hi_open else v <= hi)
        if not (ok_lo and ok_hi):
            interval = f"{'(' if lo_open else '['}{lo}, {'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}"
            return f"{key}={v!r} is outside {interval}; pass --{key}=<value in {interval}>"
    register_check(key, check)


def choice_check(key, choices):
    """Register a check that the value is one of `choices` (a callable returning them is allowed)."""
    def check(v, cfg):
        valid = choices() if callable(choices) else choices
        if v not in valid:
            return f"unknown {key} {v!r}; valid: {', '.join(map(str, valid))}"
    register_check(key, check)


def knobs(namespace):
    """The hyperparameters of a script: its lowercase module-level constants of literal type."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k == k.lower() and type(v) in LITERAL_TYPES}


def _coerce(key, value, default, source):
    """Type-check `value` against `default` (int for float is fine; list and tuple are one kind), or
    against the types registered with also_accepts."""
    if isinstance(value, _ALSO.get(key, ())):
        return list(value) if isinstance(value, tuple) else value
    if default is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(value)
    elif type(value) is type(default):
        return value
    raise UserError(f"{source}: {key} must be {type(default).__name__} like {default!r}, "
                    f"got {type(value).__name__} {value!r}")


def _parse_value(key, text, default):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if isinstance(default, str) or default is None:
            return text  # a bare word for a string key
        raise UserError(f"--{key}={text}: not a Python literal; e.g. --{key}={default!r}")


def parse(defaults, argv=()):
    """Resolve the configuration: defaults < config files (in order) < --key=value. Returns a namespace."""
    cfg = dict(defaults)
    valid = ", ".join(sorted(cfg))
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if key not in cfg:
                raise UserError(f"unknown key --{key}; valid keys: {valid}")
            if not eq:
                raise UserError(f"--{key} needs a value: --{key}=<value>")
            cfg[key] = _coerce(key, _parse_value(key, text, defaults[key]), defaults[key], f"--{key}")
        elif arg.endswith(".py"):
            if not os.path.isfile(arg):
                raise UserError(f"config file {arg} not found; give the path to a file in configs/")
            try:
                preset = knobs(runpy.run_path(arg))
            except Exception as e:  # the preset itself is broken
                raise UserError(f"config file {arg} failed to run: {type(e).__name__}: {e}")
            for key, value in preset.items():
                if key in cfg:  # keys for other scripts are ignored
                    cfg[key] = _coerce(key, value, defaults[key], arg)
            cfg["config_file"] = os.path.splitext(os.path.basename(arg))[0]
        else:
            raise UserError(f"unexpected argument {arg!r}; usage: script.py [config.py] [--key=value ...]")
    for key, checks in _CHECKS.items():
        if key in cfg:
            for check in checks:
                problem = check(cfg[key], cfg)
                if problem:
                    raise UserError(problem)
    return SimpleNamespace(**cfg)


def run_knobs(namespace):
    """Declare the shared knob block of a script (call it right after the block). Every script must
    declare the same keys and defaults: they are the run's identity. Returns the block's knobs."""
    block = knobs(namespace)
    if RUN_DEFAULTS and block != RUN_DEFAULTS:
        diff = sorted(k for k in set(block) | set(RUN_DEFAULTS) if block.get(k, ...) != RUN_DEFAULTS.get(k, ...))
        raise RuntimeError(f"the shared knob block of {namespace.get('__name__')} differs from another "
                           f"script's in {diff}: keep the block identical in all scripts")
    RUN_DEFAULTS.update(block)
    return block


def identity_keys():
    """The keys of the shared block that identify a trained run."""
    if not RUN_DEFAULTS:  # library use without a script: the block of the reference script
        __import__("gradient_accounting")
    return tuple(k for k in RUN_DEFAULTS if k not in NOT_IDENTITY)


def train_config(cfg):
    """The keys that identify the trained run (saved as config.json in its run directory). `amp` is
    recorded as the precision actually used (bf16 only where it autocasts: amp on CUDA)."""
    from .precision import precision
    d = vars(cfg)
    ident = {k: d[k] for k in identity_keys() if k in d}
    if "amp" in ident:
        del ident["amp"]
        ident["precision"] = precision(cfg)
    return ident


def identity_defaults():
    """The identity of a run at the scripts' defaults, on a CPU (fp32)."""
    identity_keys()
    return train_config(SimpleNamespace(**{**RUN_DEFAULTS, "device": "cpu"}))


def with_identity_defaults(saved):
    """A saved identity with the keys it predates (added later) at their default values."""
    return {**identity_defaults(), **saved}
