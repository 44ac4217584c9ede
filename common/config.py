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
import difflib
import io
import os
import re
import runpy
import sys
import tokenize
from types import SimpleNamespace

from .cli import UserError

LITERAL_TYPES = (bool, int, float, str, list, tuple, type(None))

# ----------------------------------------------------------------------------- the run (shared keys)
# The one definition of the keys that open every script: what a run is (its identity) and where and
# how it executes. Every script shows this block at its top, where a user may edit a value for that
# script; `run_knobs` checks the block against this one. A new shared knob is one line here (a script
# that does not show it yet gets this default). Keep new identity keys' defaults empty (None, "",
# False, []) where the knob can be off: then existing run directory names stay as they are.
RUN_DEFAULTS = dict(
    dataset="mnist_5k",    # mnist_5k (embedded) | mnist | fashion_mnist | cifar10 | cifar100 | svhn | npz:PATH
    model="resnet9",       # resnet9 | resnet18 | resnet50 | vit | cnn | torchvision:<name> |
                           # path/file.py:factory (docs/own_model.md)
    width=0.25,            # channel-width multiplier
    noise=0.1,             # fraction of training labels replaced by a wrong class: the examples to memorize
    memorized="noisy",     # noisy (mislabeled) | atypical (no label noise: clean examples with hold-out score
                           # < 0.5) | both (mislabeled + atypical clean); docs/experiments/atypical.md
    seed=0,                # data split and label noise
    model_seed=0,          # initialization, batch order, augmentation, dropout
    epochs=20,             # training epochs of the run
    batch_size=128,        # training minibatch size
    lr=0.05,               # peak learning rate (SGD)
    schedule="triangle",   # triangle (one-cycle) | cosine (linear warm-up, then cosine) | constant
    warmup=0.25,           # fraction of training spent warming up
    momentum=0.9,          # SGD momentum
    weight_decay=5e-4,     # SGD weight decay
    augment=False,         # random crop + flip (off in the paper's main runs)
    amp=True,              # bf16 autocast on CUDA (ignored elsewhere)
    device="auto",         # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    runs_dir="runs",       # relative to the repository root
    download=True,         # let torchvision download a missing dataset
    overwrite=False,       # move aside a run directory trained with another configuration
    deterministic=False,   # PyTorch deterministic algorithms: bit-reproducible on a GPU, slower (docs/reliability.md)
    groups=None,           # layer groups as module-name prefixes, e.g. ["stem", "layer1"]; None: from the module tree
    init_from="",          # the user's own per-epoch state dicts (a directory or glob) instead of training here
)
# Keys of the block that say where and how a run executes, not what it is.
NOT_IDENTITY = ("device", "runs_dir", "download", "overwrite", "deterministic", "groups")


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


def closest(key, valid):
    """The valid key that `key` is a misspelling of, or None."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.8)
    return close[0] if close else None


def unknown_key(key, valid):
    """The one-line error for a key nobody defines: the valid key it is a misspelling of, else the list."""
    if closest(key, valid):
        return UserError(f"unknown key --{key}; did you mean --{closest(key, valid)}? (--help lists every key)")
    return UserError(f"unknown key --{key}; valid keys: {', '.join(sorted(valid))} (--help explains each)")


def parse(defaults, argv=(), script=None):
    """Resolve the configuration: defaults < config files (in order) < --key=value. Returns a namespace.
    --help (or -h) prints every key with its default and meaning (help_text) and exits; `script` is the
    file whose top defines the knobs (default: the caller's file)."""
    if "--help" in argv or "-h" in argv:
        print(help_text(defaults, script or sys._getframe(1).f_globals.get("__file__", "")))
        raise SystemExit(0)
    cfg = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if key not in cfg:
                raise unknown_key(key, cfg)
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


# ----------------------------------------------------------------------------- --help

def meanings(path):
    """{knob: its comment} for the constants of a Python file (`name = value  # meaning`, also inside a
    dict(...) block as `name=value,  # meaning`); comment-only lines indented under one continue it. The
    first commented assignment of a name is its meaning."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(open(path).read()).readline))
    except (OSError, SyntaxError, tokenize.TokenError):
        return {}
    lines = {}
    for t in tokens:
        if t.type == tokenize.COMMENT:
            lines.setdefault(t.start[0], (t.start[1], t.line, t.string.lstrip("#").strip()))
    out, last = {}, None
    for n in sorted(lines):
        col, line, text = lines[n]
        m = re.match(r"\s{0,4}([a-z_][a-z0-9_]*)\s*=(?!=)", line)
        if m and col > m.end():  # the first assignment is the knob's (a later one is code using the name)
            last = m.group(1) if m.group(1) not in out else None
            if last:
                out[last] = text
        elif last and not line[:col].strip() and col > 0 and n - 1 in lines:
            out[last] += " " + text
        else:
            last = None
    return out


def help_text(defaults, script):
    """Every knob of a script with its default and meaning, grouped: the run (the shared block), then
    the script's own."""
    doc = ""
    if script and os.path.isfile(script):
        try:
            doc = (ast.get_docstring(ast.parse(open(script).read())) or "").splitlines()[0]
        except (SyntaxError, IndexError):
            pass
    own, shared = meanings(script) if script else {}, meanings(__file__)
    name = os.path.basename(script or "script.py")
    out = [f"usage: python {name} [configs/preset.py ...] [--key=value ...]", doc,
           "Values are Python literals (--lr=0.1, --seeds=[0,1]; a bare word for a text key). A config file's "
           "constants apply first, then --key=value."]

    def group(title, keys):
        if keys:
            out.extend(["", title])
            for k in keys:
                v = defaults[k]
                shown = v if isinstance(v, str) and re.fullmatch(r"[\w.:/+*-]+", v) else repr(v)
                flag = f"  --{k}={shown}"
                meaning = own.get(k) or shared.get(k, "")
                out.append(f"{flag:<34} {meaning}" if len(flag) < 34 else f"{flag}\n{'':<34} {meaning}")
    group("the run (shared by every script; defined in common/config.py):", [k for k in defaults if k in RUN_DEFAULTS])
    group(f"this {'experiment' if any(k in RUN_DEFAULTS for k in defaults) else 'command'}:",
          [k for k in defaults if k not in RUN_DEFAULTS])
    return "\n".join(x for x in out if x is not None)


def run_knobs(namespace):
    """The shared block of a script (call it right after the block): the script's values of the keys
    it shows (a user may have edited them there), RUN_DEFAULTS' for the others, in RUN_DEFAULTS' order.
    The keys it lacks are added to `namespace`, so the script's KNOBS hold the whole block."""
    block = knobs(namespace)
    unknown = [k for k in block if k not in RUN_DEFAULTS]
    if unknown:
        raise RuntimeError(f"{namespace.get('__name__')}: {unknown} in the shared block is not a shared key; "
                           f"define it in common/config.py RUN_DEFAULTS or move it below the block")
    for key, value in RUN_DEFAULTS.items():
        namespace.setdefault(key, value)
    return {k: namespace[k] for k in RUN_DEFAULTS}


def identity_keys():
    """The keys of the shared block that identify a trained run."""
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
    if ident.get("memorized") == "noisy":  # the default, as before the knob existed: run names unchanged
        del ident["memorized"]
    return ident


def identity_defaults():
    """The identity of a run at the shared block's defaults, on a CPU (fp32)."""
    return train_config(SimpleNamespace(**{**RUN_DEFAULTS, "device": "cpu"}))


def with_identity_defaults(saved):
    """A saved identity with the keys it predates (added later) at their default values."""
    return {**identity_defaults(), **saved}
