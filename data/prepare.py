"""
Prepare a dataset for train.py: train.bin and val.bin (uint16 token ids, documents separated by
<|endoftext|>, read back with np.memmap) and meta.json, in data/<name>/.

    python data/prepare.py                         # the default: the Python sources here -> data/pycode/
    python data/prepare.py --input FILE            # your own text -> data/<FILE's stem>/
    options: --tokenizer=code|byte|gpt2 (default code), --name NAME (the folder under data/, or a path),
             --overwrite (replace a dataset already there; without it, an existing one is never touched)

The default corpus is Python code that is already wherever this project runs, so nothing is downloaded:
the .py sources of the running interpreter's standard library and of the packages the project requires
(torch, numpy, tiktoken); code is where TiDAR's drafts are accepted most often. With Python 3.11.7,
torch 2.13.0, numpy 2.4.6 and tiktoken 0.14.0 that is 4,564 files (1,786 + 2,285 + 487 + 6), 82.6M train
and 4.5M val bytes, 68.3M and 3.8M tokens of the default tokenizer "code" (bytes, and runs of spaces as
single tokens). Files go to val by a hash of their name
(stdlib/os.py, torch/nn/modules/linear.py, ...). meta.json records what went in: the Python and package
versions, the files from each source, and a sha256 of the corpus. train.py calls prepare_pycode() itself
when data/pycode/ is missing.
"""
import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import sys
import sysconfig

import numpy as np
import tiktoken

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
VAL_PERCENT = 5  # of the files, chosen by hash
PACKAGES = ("torch", "numpy", "tiktoken")  # what requirements.txt installs, pytest aside
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # installed packages, caches: not the stdlib


def get_tokenizer(name):
    """The tokenizers, all as tiktoken Encodings so that every script uses one interface."""
    if name in ("byte", "code"):
        # Lossless for any text and needs no download: the 256 byte values, then for "code" one token for
        # each run of 2, 4, 8 and 16 spaces (Python's indentation, a fifth of its bytes, becomes a token or
        # two), then <|endoftext|>. Runs are merged as BPE merges pairs: 2 + 2 = 4, 4 + 4 = 8, 8 + 8 = 16.
        ranks = {bytes([b]): b for b in range(256)}
        if name == "code":
            ranks.update({b" " * n: 256 + i for i, n in enumerate((2, 4, 8, 16))})
        special = {"<|endoftext|>": len(ranks)}
        return tiktoken.Encoding(name, pat_str=r"\s+|\S+", mergeable_ranks=ranks, special_tokens=special)
    if name == "gpt2":
        try:  # tiktoken downloads the vocabulary once, or reads it from $TIKTOKEN_CACHE_DIR
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise RuntimeError(
                f"cannot load the GPT-2 BPE vocabulary ({type(e).__name__}); tiktoken needs the network "
                "once, or a copy in the folder named by TIKTOKEN_CACHE_DIR; or use an offline tokenizer: "
                "--tokenizer=code or byte"
            ) from None
    raise ValueError(f"unknown tokenizer {name!r}: use 'code', 'byte' or 'gpt2'")


def python_sources(root, prefix):
    """{prefix/path relative to root, with '/': text} for the .py files under root."""
    docs = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for f in filenames:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                try:
                    text = open(path, encoding="utf-8").read()
                except (UnicodeDecodeError, OSError):
                    continue  # a few test files are deliberately in other encodings
                docs[f"{prefix}/" + os.path.relpath(path, root).replace(os.sep, "/")] = text
    return docs


def package_folder(name):
    """Where an installed package's sources are, found as `import name` would find them (not imported)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed: pip install -r requirements.txt")
    return spec.submodule_search_locations[0]


def is_val(relpath):
    # A hash of the path, not a random draw or a position in a list: a file stays on its side of the
    # split when other files come or go (another Python version), so val never leaks into train.
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def write_dataset(out_dir, train_docs, val_docs, tokenizer, **meta):
    """Tokenize, write train.bin / val.bin / meta.json into out_dir, return the meta dict."""
    enc = get_tokenizer(tokenizer)
    if enc.n_vocab + 1 > 2**16:
        raise ValueError(f"tokenizer {tokenizer!r} has {enc.n_vocab} tokens: its ids and [MASK] must fit in "
                         "uint16")
    made = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ("meta.json", "train.bin", "val.bin")]
    try:
        if os.path.exists(paths[0]):  # an older dataset here stops being one before any of its files changes
            os.remove(paths[0])
        for split, docs in (("train", train_docs), ("val", val_docs)):
            with open(os.path.join(out_dir, f"{split}.bin"), "wb") as f:
                # a few hundred files at a time: token lists take 8 bytes a token
                for i in range(0, len(docs), 256):
                    # encode_ordinary: a literal "<|endoftext|>" inside a file is text, not a document end
                    for ids in enc.encode_ordinary_batch(docs[i : i + 256]):
                        f.write(np.array(ids + [enc.eot_token], dtype=np.uint16).tobytes())
            meta[f"{split}_tokens"] = os.path.getsize(f.name) // 2
        meta = dict(tokenizer=tokenizer, vocab_size=enc.n_vocab, mask_id=enc.n_vocab, eot_id=enc.eot_token,
                    **meta)
        with open(paths[0], "w") as f:  # written last: its presence means the dataset is complete
            json.dump(meta, f, indent=1)
    except BaseException:  # Ctrl-C or a full disk: leave nothing half-written behind
        for path in paths:
            if os.path.exists(path):
                os.remove(path)
        if made and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    return meta


def corpus_sha256(docs):
    h = hashlib.sha256()
    for name, text in docs.items():
        h.update(f"{name}\0{text}\0".encode())
    return h.hexdigest()


def prepare_pycode(out_dir=os.path.join(DATA_DIR, "pycode"), stdlib=None, packages=PACKAGES,
                   tokenizer="code"):
    """The default dataset: the standard library's .py files as stdlib/..., each package's as <name>/..."""
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    sources = {"stdlib": python_sources(stdlib, "stdlib")}
    sources.update({name: python_sources(package_folder(name), name) for name in packages})
    if not sources["stdlib"]:
        raise FileNotFoundError(f"no .py files under {stdlib}")
    docs = dict(sorted(item for files in sources.values() for item in files.items()))
    train = [text for name, text in docs.items() if not is_val(name)]
    val = [text for name, text in docs.items() if is_val(name)]
    versions = dict(python=platform.python_version(),
                    **{name: importlib.metadata.version(name) for name in packages})
    return write_dataset(out_dir, train, val, tokenizer,
                         source="python code: the stdlib and " + ", ".join(packages), versions=versions,
                         files={name: len(docs) for name, docs in sources.items()}, n_files=len(docs),
                         corpus_sha256=corpus_sha256(docs))


def prepare_file(path, out_dir, tokenizer="code"):
    try:
        text = open(path, encoding="utf-8").read()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not text:
        raise ValueError(f"{path} is empty: give a file with the text to train on")
    cut = len(text) * 9 // 10  # one document: split by position, the last 10% is val
    return write_dataset(out_dir, [text[:cut]], [text[cut:]], tokenizer, source=os.path.abspath(path),
                         n_files=1, corpus_sha256=corpus_sha256({os.path.basename(path): text}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="a UTF-8 text file (default: this machine's Python sources)")
    parser.add_argument("--tokenizer", default="code", choices=["code", "byte", "gpt2"])
    parser.add_argument("--name",
                        help="output folder under data/, or a path (default: pycode, or the input's stem)")
    parser.add_argument("--overwrite", action="store_true", help="replace the dataset already in that folder")
    args = parser.parse_args()
    name = args.name or (os.path.splitext(os.path.basename(args.input))[0] if args.input else "pycode")
    out_dir = os.path.join(DATA_DIR, name)  # an absolute --name stays as it is
    # an existing dataset is never touched unasked: models may have been trained on it
    if os.path.exists(os.path.join(out_dir, "meta.json")) and not args.overwrite:
        sys.exit(f"prepare.py: error: {out_dir} already holds a dataset: pick another --name, or replace it "
                 "with --overwrite")
    try:
        if args.input:
            meta = prepare_file(args.input, out_dir, args.tokenizer)
        else:
            meta = prepare_pycode(out_dir, tokenizer=args.tokenizer)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"prepare.py: error: {e}")
    except KeyboardInterrupt:
        print(f"prepare.py: interrupted; nothing was left in {out_dir}", file=sys.stderr)
        sys.exit(130)
    print(f"wrote {out_dir}: {meta['n_files']} file(s), {meta['train_tokens']:,} train and "
          f"{meta['val_tokens']:,} val tokens ({args.tokenizer}, vocab {meta['vocab_size']})")
    print(f"train on it with: python train.py {shlex.quote('--data_dir=' + os.path.relpath(out_dir))}")
