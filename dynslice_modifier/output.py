"""Write a model directory so that it is either complete or absent.

Everything is written to a hidden temporary directory beside the target and renamed into
place at the end; a previous result at the target survives a failed or interrupted run. Only
an empty directory or an earlier sliced checkpoint, holding nothing a save does not write, is
ever replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path

from dynslice_modifier.modeling.modeling_dynslice import REPORT_FILES

# What a save of a sliced checkpoint writes (transformers, llm-compressor, the tokenizer; and
# this package's report, ``REPORT_FILES``): an earlier output holding only these may be
# replaced whole. Names, not wildcards: a user's "dense_baseline.safetensors" or
# "tokenizer_notes.txt" beside them must stop the replacement, not be deleted with it.
CHECKPOINT_FILES = re.compile(
    r"""(
      config\.json | generation_config\.json | recipe\.yaml
    | model(-\d+-of-\d+)?\.safetensors | model\.safetensors\.index\.json
    | tokenizer(_config)?\.json | tokenizer\.model(\.v\d+)? | special_tokens_map\.json
    | added_tokens\.json | vocab\.(json|txt) | merges\.txt | chat_template\.(jinja|json)
    | processor_config\.json | preprocessor_config\.json
    | configuration_dynslice\.py | modeling_dynslice\.py
    )""",
    re.VERBOSE,
)
# A tokenizer with several chat templates saves the others in this directory.
CHECKPOINT_DIRS = ("additional_chat_templates",)


def check_target(target: Path, inputs: list[Path]) -> None:
    """Refuse to write over or into a model we are reading, or over what is not ours."""
    resolved = target.resolve()
    for source in inputs:
        source = source.resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise ValueError(
                f"output directory {resolved} overlaps the input model {source}; "
                "choose a separate output directory (the input is never modified)"
            )
    # Unresolved, so that a link to nothing is seen as one.
    check_replaceable(target)


def check_replaceable(target: Path) -> None:
    """The target is replaced whole, deleting what it holds: only an empty directory or
    an earlier sliced checkpoint may be there, and it is written beside itself first, then
    renamed into place."""
    if Path(target).is_symlink() and not Path(target).exists():
        raise ValueError(
            f"output path {target} is a symbolic link to nothing ({os.readlink(target)}); "
            "name a real directory for the output, or create the link's target first"
        )
    target = target.resolve()
    if os.path.ismount(target):
        raise ValueError(
            f"output directory {target} is a mount point, which cannot be replaced by a "
            "rename (the output is written beside it and renamed into place): name a new "
            f"directory inside it, e.g. {target / 'model'}"
        )
    writable = _existing_ancestor(target.parent)
    if not writable.is_dir():
        raise ValueError(
            f"cannot create the output directory {target}: {writable} is a file, not a "
            "directory; choose another output directory"
        )
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ValueError(
            f"cannot write the output beside {target}: {writable} is not writable (the output "
            "is written there first and renamed into place); choose another output directory"
        )
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ValueError(
            f"output directory {target} is the current directory or holds it; it would be "
            "replaced whole: name a new directory for the output"
        )
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise ValueError(
            f"output path {target} exists and is not a directory; name a new directory for "
            "the output or remove it yourself"
        )
    if not any(target.iterdir()):
        return
    if not is_sliced_checkpoint(target):
        raise ValueError(
            f"output directory {target} is not empty and is not a sliced checkpoint of an "
            "earlier run; it would be replaced whole, deleting what it holds: name a new "
            "directory for the output or remove it yourself"
        )
    foreign = sorted(
        entry.name + ("/" if entry.is_dir() else "")
        for entry in target.iterdir()
        if not _written_by_a_save(entry)
    )
    if foreign:
        raise ValueError(
            f"output directory {target} holds a sliced checkpoint and also {foreign}, which "
            "no save writes; the directory would be replaced whole, deleting them: move "
            "them out or name a new directory for the output"
        )
    if not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(
            f"output directory {target} is not writable, so the files it holds could not be "
            "deleted when the new output replaces it: make it writable (chmod u+w) or name "
            "a new directory for the output"
        )


def _written_by_a_save(entry: Path) -> bool:
    if entry.is_dir():
        return entry.name in CHECKPOINT_DIRS
    return entry.name in REPORT_FILES or CHECKPOINT_FILES.fullmatch(entry.name) is not None


def is_sliced_checkpoint(path: Path) -> bool:
    # report imports this module, so its reader of sliced configs is imported here.
    from dynslice_modifier.report import read_sliced_config

    try:
        read_sliced_config(path)
    except (OSError, ValueError):
        return False
    return True


def check_free_space(target: Path, needed: int) -> None:
    """Fail before any calibration if the output cannot fit beside ``target``."""
    parent = _existing_ancestor(Path(target).resolve().parent)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise OSError(
            f"not enough free disk for the output: about {needed / 2**20:.0f} MiB needed "
            f"beside {target}, {free / 2**20:.0f} MiB free on {parent}; free space or choose "
            "another output directory"
        )


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _missing_ancestors(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def _remove_if_empty(directories: list[Path]) -> None:
    """Take back the directories a failed run created for its output, deepest first, as
    far as nothing else was written into them meanwhile."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``target`` only if the block succeeds."""
    check_replaceable(Path(target))
    target = Path(target).resolve()
    created = _missing_ancestors(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_scratch(target)
    scratch = Path(tempfile.mkdtemp(prefix=_scratch_prefix(target, "partial"), dir=target.parent))
    # mkdtemp makes a private (0700) directory; the result should look like any other.
    umask = os.umask(0)
    os.umask(umask)
    scratch.chmod(0o777 & ~umask)
    previous = None
    try:
        yield scratch
        if target.exists():
            previous = Path(
                tempfile.mkdtemp(prefix=_scratch_prefix(target, "previous"), dir=target.parent)
            )
            previous.rmdir()
            os.replace(target, previous)
        os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        if scratch.exists():
            # Its name marks it unfinished, and a later write beside it removes it.
            warnings.warn(
                f"could not remove the unfinished output {scratch}; delete it",
                stacklevel=3,
            )
        if previous is not None and previous.exists() and not target.exists():
            os.replace(previous, target)
        _remove_if_empty(created)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _scratch_prefix(target: Path, kind: str) -> str:
    # Host and PID of the writer: on a shared filesystem only this host can tell whether
    # the PID is alive.
    return f".{_short_name(target)}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def _short_name(target: Path) -> str:
    """``target``'s name, shortened where a scratch name built on it would pass the
    filesystems' 255-byte limit on names."""
    name = target.name
    if len(name.encode()) <= 100:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name.encode()[:64].decode(errors='ignore')}-{digest}"


def _remove_dead_scratch(target: Path) -> None:
    """Clear what killed runs (SIGKILL, power loss) on this host left beside ``target``.

    A dead writer's ``partial`` directory is garbage. Its ``previous`` directory is the
    last finished output, moved aside to be replaced: put back if nothing replaced it,
    else deleted. A live PID (a concurrent run, or a reused PID) and another host's
    directories are left alone.
    """
    pattern = re.compile(
        rf"\.{re.escape(_short_name(target))}\.(partial|previous)-{re.escape(socket.gethostname())}"
        r"-(\d+)-[^-]*$"
    )
    for candidate in sorted(target.parent.iterdir()):
        match = pattern.match(candidate.name)
        if match is None or not candidate.is_dir() or _alive(int(match.group(2))):
            continue
        if match.group(1) == "previous" and not target.exists():
            os.replace(candidate, target)
        else:
            shutil.rmtree(candidate, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # owned by someone else
    return True


def directory_size(path: str | Path, leave_out: Collection[str] = ()) -> int:
    """Bytes of the files under ``path``, but for those named in ``leave_out``."""
    root = Path(path)
    return sum(
        f.stat().st_size
        for f in root.rglob("*")
        if f.is_file() and f.relative_to(root).as_posix() not in leave_out
    )
