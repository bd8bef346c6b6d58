"""Input directory layouts of training stacks: one module per stack, found through a registry.

A *layout* turns a directory a training library wrote (Lightning, accelerate, the transformers
Trainer) into ONE logical checkpoint: it opens the model and optimizer files with the ordinary
format readers (:mod:`shardfix.sources`) and composes them into a
:class:`~shardfix.sources.composite.CompositeSource` whose entry paths the classifier
understands, listing the files it does not convert with the reason. Each module defines
``NAME``, ``DESCRIBE``, a pure ``detect(dir) -> bool`` (file names only, no reads beyond a
directory listing) and ``open(dir, trust_pickle) -> Source``. :mod:`shardfix.sources` consults
:data:`REGISTRY` before the plain formats, so adding a stack is one module and one line here.
"""

from __future__ import annotations

from pathlib import Path

from shardfix.errors import BadInputError
from shardfix.io.regular import scan_checkpoint
from shardfix.layouts import accelerate, lightning, trainer
from shardfix.sources import FORMATS, Source, SourceFormat, detect_format, open_source

#: Most specific first: a Lightning FSDP directory is also a DCP directory.
REGISTRY: dict[str, SourceFormat] = {
    m.NAME: SourceFormat(m.NAME, m.detect, m.open, m.DESCRIBE) for m in (lightning, accelerate, trainer)
}


def detect_layout(path: Path) -> str | None:
    """The name of the layout that recognises directory ``path``, or None."""
    if not path.is_dir():
        return None
    for layout in REGISTRY.values():
        if layout.detect(path):
            return layout.name
    return None


def detect_checkpoint(path: str | Path) -> str:
    """The name of the layout or file format that recognises ``path``: training-stack layouts first
    (their directories hold files of the plain formats), then :data:`shardfix.sources.FORMATS`.

    Raises:
        BadInputError: the path does not exist or nothing recognises it; the message lists what
            the directory holds and everything shardfix reads.
    """
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: no such file or directory; pass the checkpoint's path")
    name = detect_layout(p) or detect_format(p)
    if name is not None:
        return name
    described = [(f.name, f.describe) for f in REGISTRY.values()] + [(f.name, f.describe) for f in FORMATS.values()]
    kinds = "; ".join(f"{name}: {what}" for name, what in described)
    found = sorted(c.name + ("/" if c.is_dir() else "") for c in p.iterdir())[:20] if p.is_dir() else []
    what = f"found {', '.join(found) or 'nothing'}; " if p.is_dir() else ""
    raise BadInputError(f"{p}: not a checkpoint shardfix can read ({what}shardfix reads {kinds})")


def open_checkpoint(path: str | Path, format: str | None = None, *, trust_pickle: bool = False,
                    follow_symlinks: bool = False) -> Source:
    """Open the logical checkpoint at ``path``: a training-stack layout or a plain file format.

    Before any reader opens a file, :func:`shardfix.io.regular.scan_checkpoint` checks that every
    file is a regular file inside ``path`` (see that module); the symlinks ``follow_symlinks``
    let it follow out of ``path`` are listed in the index's notes. Executors reopen a checkpoint
    by ``format`` after the first open scanned it; the readers' own opens still refuse
    non-regular files.

    Args:
        path: the checkpoint file or directory.
        format: a layout or format name (as a report records it), or None to detect.
        trust_pickle: let torch.save files be fully unpickled (runs code in the file).
        follow_symlinks: read files that symlinks inside ``path`` point to outside it.
    """
    notes = scan_checkpoint(path, follow_symlinks) if format is None else []
    name = format or detect_checkpoint(path)
    if name in REGISTRY:
        source = REGISTRY[name].open(Path(path), trust_pickle=trust_pickle)
    else:
        source = open_source(path, name, trust_pickle=trust_pickle)
    source.index.notes.extend(notes)
    return source
