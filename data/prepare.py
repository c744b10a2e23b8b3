"""
Prepare a dataset for train.py: train.bin and val.bin (uint16 token ids, documents separated by
<|endoftext|>, read back with np.memmap) and meta.json, in data/<name>/.

    python data/prepare.py                         # the default: this Python's standard library -> data/pystdlib/
    python data/prepare.py --input FILE            # your own text -> data/<FILE's stem>/
    options: --tokenizer=byte|gpt2 (default byte), --name NAME (the folder under data/, or a path)

The default corpus is the .py sources of the standard library of the interpreter running this script:
about 30 MB of code that exists wherever Python does, so nothing is downloaded, and code is where TiDAR's
drafts are accepted most often. train.py calls prepare_stdlib() itself when data/pystdlib/ is missing.
"""
import argparse
import hashlib
import json
import os
import platform
import sys
import sysconfig

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tidar.py is one folder up
from tidar import get_tokenizer  # noqa: E402

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
VAL_PERCENT = 5  # of the stdlib files, chosen by hash
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # installed packages and caches are not the stdlib


def stdlib_sources(root=None):
    """{path relative to root, with '/': text} for the .py files under root (default: this Python's stdlib)."""
    root = root or sysconfig.get_paths()["stdlib"]
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
                docs[os.path.relpath(path, root).replace(os.sep, "/")] = text
    return dict(sorted(docs.items()))


def is_val(relpath):
    # A hash of the path, not a random draw or a position in a list: a file stays on its side of the
    # split when other files come or go (another Python version), so val never leaks into train.
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def write_dataset(out_dir, train_docs, val_docs, tokenizer, **meta):
    """Tokenize, write train.bin / val.bin / meta.json into out_dir, return the meta dict."""
    enc = get_tokenizer(tokenizer)
    assert enc.n_vocab + 1 <= 2**16, "token ids and [MASK] must fit in uint16"
    os.makedirs(out_dir, exist_ok=True)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        with open(os.path.join(out_dir, f"{split}.bin"), "wb") as f:
            # encode_ordinary: a literal "<|endoftext|>" inside a file is text, not a document boundary
            for ids in enc.encode_ordinary_batch(docs):
                f.write(np.array(ids + [enc.eot_token], dtype=np.uint16).tobytes())
        meta[f"{split}_tokens"] = os.path.getsize(f.name) // 2
    meta = dict(tokenizer=tokenizer, vocab_size=enc.n_vocab, mask_id=enc.n_vocab, eot_id=enc.eot_token,
                python_version=platform.python_version(), **meta)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:  # written last: its presence means the dataset is complete
        json.dump(meta, f, indent=1)
    return meta


def corpus_sha256(docs):
    h = hashlib.sha256()
    for name, text in docs.items():
        h.update(f"{name}\0{text}\0".encode())
    return h.hexdigest()


def prepare_stdlib(out_dir=os.path.join(DATA_DIR, "pystdlib"), root=None, tokenizer="byte"):
    docs = stdlib_sources(root)
    if not docs:
        raise FileNotFoundError(f"no .py files under {root or sysconfig.get_paths()['stdlib']}")
    train = [text for name, text in docs.items() if not is_val(name)]
    val = [text for name, text in docs.items() if is_val(name)]
    return write_dataset(out_dir, train, val, tokenizer, source="python stdlib", n_files=len(docs),
                         corpus_sha256=corpus_sha256(docs))


def prepare_file(path, out_dir, tokenizer="byte"):
    try:
        text = open(path, encoding="utf-8").read()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    cut = len(text) * 9 // 10  # one document: split by position, the last 10% is val
    return write_dataset(out_dir, [text[:cut]], [text[cut:]], tokenizer, source=os.path.abspath(path), n_files=1,
                         corpus_sha256=corpus_sha256({os.path.basename(path): text}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="a UTF-8 text file (default: the Python standard library)")
    parser.add_argument("--tokenizer", default="byte", choices=["byte", "gpt2"])
    parser.add_argument("--name", help="output folder under data/, or a path (default: pystdlib, or the input's stem)")
    args = parser.parse_args()
    name = args.name or (os.path.splitext(os.path.basename(args.input))[0] if args.input else "pystdlib")
    out_dir = os.path.join(DATA_DIR, name)  # an absolute --name stays as it is
    try:
        if args.input:
            meta = prepare_file(args.input, out_dir, args.tokenizer)
        else:
            meta = prepare_stdlib(out_dir, tokenizer=args.tokenizer)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"prepare.py: error: {e}")
    print(f"wrote {out_dir}: {meta['n_files']} file(s), {meta['train_tokens']:,} train and {meta['val_tokens']:,} "
          f"val tokens ({args.tokenizer}, vocab {meta['vocab_size']})")
    print(f"train on it with: python train.py --data_dir={os.path.relpath(out_dir)}")
