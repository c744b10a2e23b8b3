"""
The command line of the scripts. train.py's settings, in the manner of nanoGPT's configurator.py: each
setting at the top of train.py is overridden with --name=value under the same name, and --help lists them
with their comments. A wrong name, type or choice is one line on stderr and exit status 2 (a usage error),
before anything slow happens. And what every script shares: fail(), its one way to stop on a bad input,
quiet_exits(), which turns a Ctrl-C or a closed pipe into one line instead of a traceback, read_prompts()
for sample.py's --prompt, and timed().
"""
import ast
import difflib
import os
import re
import sys
import time


def fail(msg, code=1):
    print(f"{os.path.basename(sys.argv[0])}: error: {msg}", file=sys.stderr)  # one line, no traceback
    sys.exit(code)


def quiet_exits(note=""):
    """
    A sys.excepthook for a script: an uncaught Ctrl-C prints `script: interrupted<note>` (and a shell sees
    exit status 130, as for any program stopped by Ctrl-C); output into a closed pipe (`... | head`) ends
    the script silently, with exit status 1. Any other exception keeps its traceback.
    """
    def hook(kind, value, traceback):
        if issubclass(kind, BrokenPipeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        elif not issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, traceback)
        elif os.environ.get("RANK", "0") == "0":  # torchrun passes Ctrl-C to every process
            print(f"{os.path.basename(sys.argv[0])}: interrupted{note}", file=sys.stderr)

    return hook


def parse_overrides(args, settings, choices, script, cpu_preset):
    """{name: value} for args like ["--n_layer=4", "--out_dir=out2"], each checked against settings[name]."""
    if "--help" in args or "-h" in args:
        print_help(settings, script, cpu_preset)
        sys.exit(0)
    overrides = {}
    for arg in args:
        key, eq, raw = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and key in settings and not eq:
            fail(f"{arg} needs its value after '=', as in {arg}={settings[key]} (a value after a space is "
                 "not read)", 2)
        if not arg.startswith("--") or key not in settings:
            near = difflib.get_close_matches(key, settings, 1)
            fail(f"unknown setting {arg!r}" + (f" (did you mean --{near[0]}?)" if near else "") +
                 "; settings are written --name=value, and `python train.py --help` lists them", 2)
        default = settings[key]
        try:  # a Python literal, or the bare text for settings that are strings
            value = raw if isinstance(default, str) and key not in choices else ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        value = float(value) if type(default) is float and type(value) is int else value
        if key in choices and not any(value == c and type(value) is type(c) for c in choices[key]):
            fail(f"--{key}={raw}: expected one of {', '.join(map(repr, choices[key]))}", 2)
        if key not in choices and type(value) is not type(default):
            fail(f"--{key}={raw}: expected {type(default).__name__} (like --{key}={default!r})", 2)
        overrides[key] = value
    return overrides


def print_help(settings, script, cpu_preset):
    """The script's docstring, then each setting with its default and the comment beside it in the script."""
    source = open(script).read()
    comments = dict(re.findall(r"^(\w+) = .*?  # (.*)$", source, re.M))
    doc = ast.get_docstring(ast.parse(source))
    print(f"usage: python {os.path.basename(script)} [--name=value ...]\n\n{doc}")
    print("\nsettings, with their defaults:")
    for key, default in settings.items():
        print(f"  --{key}={default}".ljust(28) + f"  # {comments.get(key, '')}")
    print("\nwith no GPU, a fresh run takes instead (unless set on the command line):\n  " +
          " ".join(f"--{k}={v}" for k, v in cpu_preset.items()))


def read_prompts(text, enc, batch_size):
    """sample.py's --prompt as (texts, their ids): the prompts of a FILE: that holds several (separated by
    lines '<|endoftext|>'), or batch_size copies of one."""
    if text.startswith("FILE:"):
        try:
            with open(text[5:], encoding="utf-8") as f:
                texts = [t for t in re.split(r"^<\|endoftext\|>\n?", f.read(), flags=re.M) if t] or [""]
        except OSError as e:
            fail(f"cannot read prompt file {text[5:]!r}: {e.strerror}")
        except UnicodeDecodeError:
            fail(f"prompt file {text[5:]!r} is not UTF-8 text: save it as UTF-8")
    else:
        texts = [text]
    texts = texts if len(texts) > 1 else texts * batch_size
    return texts, [enc.encode(t, allowed_special="all") for t in texts]


def timed(fn, device):
    """(fn(), the seconds it took), the device waited for on CUDA before and after."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - t0
