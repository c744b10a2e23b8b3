import atexit
import faulthandler
import logging
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRESH_PATH = list(sys.path)  # for run_script's children: sys.path before the tests add the project's folders
sys.path.insert(0, ROOT)

from tidar import GPT, GPTConfig  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: threads only add contention (and CI has 2 cores)


@pytest.fixture
def tiny():
    """A tiny random GPT in float64 on the CPU: equivalence tests must not hide behind bf16 rounding."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=11, eot_id=10, seq_len=48, block_len=4, n_layer=2, n_head=2, n_embd=16)
    return GPT(config).double().eval()


BYTE_MODEL = GPTConfig(vocab_size=257, eot_id=256, seq_len=96, block_len=4, n_layer=1, n_head=2, n_embd=16)


def write_checkpoint(out_dir, config=BYTE_MODEL, tokenizer="byte"):
    """A checkpoint of a random model, in the format train.py writes (the parts sample.py reads)."""
    torch.manual_seed(0)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = {"model": GPT(config).state_dict(), "model_config": asdict(config), "tokenizer": tokenizer}
    torch.save(ckpt, os.path.join(out_dir, "ckpt.pt"))


class Drafts(torch.nn.Module):
    """
    Wraps a model and overrides what its [MASK] slots say, row by row, to force the verifier's hand:
    'oracle' drafts the true next tokens (everything is accepted), 'garbage' a wrong token (everything is
    rejected), 'noisy' is right at some positions and wrong at others, 'model' leaves the row alone.
    truths: per row, the prompt and the AR model's continuation. The AR rows are untouched.
    """

    def __init__(self, model, truths, modes):
        super().__init__()
        self.model, self.config, self.truths, self.modes = model, model.config, truths, modes

    def forward(self, idx, pos, mask, cache=None):
        logits = self.model(idx, pos, mask, cache)
        pos = pos.expand(idx.shape)
        for b, t in (idx == self.config.mask_id).nonzero().tolist():
            truth, mode, p = self.truths[b], self.modes[b], int(pos[b, t])
            if mode == "model":
                continue
            right = truth[p] if p < len(truth) else 0
            wrong = mode == "garbage" or (mode == "noisy" and p in (7, 8, 13, 21, 22, 23, 27))
            logits[b, t] = -30.0
            logits[b, t, (right + 1) % self.config.vocab_size if wrong else right] = 30.0
        return logits


def random_prompt(seed, n=5):
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def scale_weights(model, factor):
    """Every weight times factor: distributions further from uniform, so that the context moves the argmax."""
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(factor)
    return model


def run_script(script, *args, prelude="", env=None, cwd=ROOT, timeout=300):
    """
    `python script *args` from cwd, as subprocess.run(..., capture_output=True, text=True) returns it, but in
    a child forked from pytest (torch imported: milliseconds, not seconds). script: from the repository's root
    or absolute; prelude: code run in the child first, to patch it alone; env: os.environ updates. The child
    imports the project's modules afresh, from a fresh sys.path, and prints warnings as python does; it keeps
    torch's one thread. torchrun or a real pipe need subprocess; so does a pytest that has set up CUDA (a
    forked child cannot use it): then this runs a real interpreter.
    """
    return start_script(script, *args, prelude=prelude, env=env, cwd=cwd).wait(timeout)


def start_script(script, *args, prelude="", env=None, cwd=ROOT):
    """run_script without waiting: the running child, for a test that runs several at once or meets one."""
    # what a first torch.optim optimizer imports (2 s): once here, not in each child
    import torch._dynamo  # noqa: F401

    if torch.cuda.is_initialized():  # on a GPU, after a CUDA test: a real interpreter
        launch = f"{prelude}\nimport runpy, sys\nsys.argv = sys.argv[1:]\n" \
                 "runpy.run_path(sys.argv[0], run_name='__main__')"
        return Interpreter([sys.executable, "-c", launch, os.path.join(ROOT, script), *args], cwd=cwd,
                           env={**os.environ, **(env or {})}, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            code = _run_in_child(os.path.join(ROOT, script), [script, *args], prelude, env, cwd, out, err)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return Script(pid, [script, *args], out, err)


def _run_in_child(path, argv, prelude, env, cwd, out, err):
    """What the interpreter does with `python path argv[1:]`: its exit status, as CPython would set it."""
    atexit._clear()  # pytest's exit handlers are not the script's
    faulthandler.disable()
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1,
                                       closefd=False)
    sys.stdin = sys.__stdin__ = open(os.devnull)
    sys.excepthook = sys.__excepthook__
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.update(env or {})
    os.chdir(cwd)
    sys.argv = argv
    project = {ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "experiments")}
    fresh = [p for p in FRESH_PATH if p and os.path.realpath(p) not in project]  # as `python path` starts
    sys.path[:] = [os.path.dirname(os.path.realpath(path))] + fresh
    for name, module in list(sys.modules.items()):  # the project's modules, imported again by the script
        folder = os.path.dirname(os.path.realpath(getattr(module, "__file__", None) or "/"))
        if folder in project | {os.path.join(ROOT, "data")}:
            del sys.modules[name]
    # warnings printed to stderr, under python's default filters (pytest records them, and shows more)
    warnings.resetwarnings()
    for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = warnings._showwarning_orig
    warnings._showwarnmsg_impl = lambda msg: sys.stderr.write(warnings._formatwarnmsg(msg))
    logging.root.handlers = [h for h in logging.root.handlers if not type(h).__module__.startswith("_pytest")]
    logging.root.setLevel(logging.WARNING)
    interrupted = False
    try:
        sys.path.insert(0, ROOT)  # for the prelude, which may patch the project's modules before the script
        exec(prelude, {"__name__": "__prelude__"})
        sys.path.remove(ROOT)
        runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as e:  # None: 0; a number: itself; anything else is printed, and 1
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException as e:  # the traceback (or the script's own hook), then 1, or Ctrl-C's signal
        tbs = [e.__traceback__]
        while tbs[-1].tb_next:
            tbs.append(tbs[-1].tb_next)
        # from the script's first frame on, as python shows it: not this function's or runpy's
        tb = next((tb for tb in tbs if tb.tb_frame.f_code.co_filename == path), e.__traceback__)
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        code, interrupted = 1, isinstance(e, KeyboardInterrupt)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    if interrupted:  # as CPython ends after an uncaught Ctrl-C: by the signal itself
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code & 0xFF


class Interpreter(subprocess.Popen):
    """start_script's real interpreter: pid, poll(), and wait(timeout) -> CompletedProcess, as Script's."""

    def wait(self, timeout=None):
        if self.stdout is None or self.stdout.closed:  # (communicate() itself waits through here)
            return super().wait(timeout)
        out, err = self.communicate(timeout=timeout)
        return subprocess.CompletedProcess(self.args[3:], self.returncode, out, err)


class Script:
    """A script running in a forked child (start_script): pid, poll(), wait(timeout) -> CompletedProcess."""

    def __init__(self, pid, args, out, err):
        self.pid, self.args, self.out, self.err = pid, args, out, err
        self.returncode = self.result = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=300):
        if self.result is not None:
            return self.result
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.005)
        text = []
        for f in (self.out, self.err):
            f.seek(0)
            text.append(f.read().decode("utf-8", errors="replace"))
            f.close()
        self.result = subprocess.CompletedProcess(self.args, self.returncode, *text)
        return self.result
