"""The one way laptop-deploy writes an output folder: checked before any model loads, replaced atomically, and
never at the expense of anything laptop-deploy did not write.

Every folder a verb writes (a student, a distillation run, an export artifact, a bundle...) holds a marker file,
:data:`MARKER` (``.laptop-deploy.json``): ``{"written_by": "laptop-deploy", "kind": ..., "entries": [...]}``, the
top-level names the command wrote or may write there. ``--force`` replaces a folder only when every name in it is
one of those (or the folder is empty); anything else is a user's file and the command refuses, naming it.

Lifecycle of a verb::

    out = prepare_output(args.out, force=args.force)        # first thing: exit 2 before any model loads
    ...load, compute...
    write_atomically(out, lambda tmp: write_into(tmp), force=args.force, kind="artifact")

``write_atomically`` builds the new content in a temporary sibling (``.NAME.new-XXXX``), renames the old folder
aside (``.NAME.old-XXXX``), renames the new one in, then deletes the old one: a crash at any moment leaves the old
or the new folder whole (after a crash between the two renames both survive as hidden siblings). A process killed
outright (SIGKILL, the OOM killer: no cleanup runs) leaves its hidden siblings behind — gigabytes for a full-size
export — so the next ``write_atomically`` to the same folder removes them (:func:`sweep_leftovers`): a sibling's
name carries the writer's host and process id (``.NAME.new-PID-HOST-XXXX``), and it is removed once that
process is gone (from the same host only: a process id means nothing on another machine sharing the folder).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import LaptopDeployError, OutputError

MARKER = ".laptop-deploy.json"
WRITTEN_BY = "laptop-deploy"
# Temporary siblings and staging folders this module makes; a crash may leave them inside an owned folder.
_TEMP_TAGS = (".new-", ".old-", ".write-probe-")
# Folders written before the marker existed, recognised by their unambiguous metadata: a student (its format tag;
# a distillation run also holds its checkpoints and log) and an export artifact (manifest.json listing its files).
_LEGACY_STUDENT = {"config.json", "student.safetensors", "laptop_deploy_student.json", "pruning_plan.json",
                   "pruning_report.md", "checkpoints", "distill_log.jsonl", "distill_summary.json"}


def as_path(value: str | os.PathLike[str], *, what: str = "path") -> Path:
    """``value`` as a :class:`Path`; anything that is not a string or path-like is a :class:`LaptopDeployError`
    (the public API takes ``str | os.PathLike`` wherever it takes a path)."""
    try:
        return Path(os.fspath(value))
    except TypeError:
        raise LaptopDeployError(f"{what} must be a str or os.PathLike, got {type(value).__name__}") from None


def _describe(names: list[str], folder: Path) -> str:
    shown = [f"{n}/" if (folder / n).is_dir() and not (folder / n).is_symlink() else n for n in names[:3]]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(shown) + more


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder`` (None when absent, unreadable, or not laptop-deploy's)."""
    path = folder / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("written_by") == WRITTEN_BY and isinstance(data.get("entries"), list)
    return data if ok else None


def _legacy_entries(folder: Path) -> set[str] | None:
    """Names a pre-marker laptop-deploy folder may hold, from its own metadata; None when it has none."""
    try:
        meta = json.loads((folder / "laptop_deploy_student.json").read_text())
        if isinstance(meta, dict) and meta.get("format") == "laptop-deploy-student":
            return _LEGACY_STUDENT | {str(meta.get("weights", ""))}
    except (OSError, ValueError):
        pass
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if isinstance(manifest, dict) and "target" in manifest and isinstance(manifest.get("files"), dict) \
                and isinstance(manifest.get("tools"), dict):
            return {"manifest.json"} | {name.split("/")[0] for name in manifest["files"]}
    except (OSError, ValueError):
        pass
    if (folder / "checkpoints" / "last.pt").is_file() and (folder / "distill_log.jsonl").is_file():
        return _LEGACY_STUDENT  # a distillation run stopped before its student was written
    return None


def foreign_entries(folder: Path) -> list[str]:
    """Top-level names in ``folder`` that laptop-deploy did not write (sorted); [] for an empty or owned folder."""
    names = sorted(os.listdir(folder))
    marker = read_marker(folder)
    allowed = set(marker["entries"]) | {MARKER} if marker else _legacy_entries(folder)
    if allowed is None:
        return names
    return [n for n in names if n not in allowed and not (n.startswith(".") and any(t in n for t in _TEMP_TAGS))]


def _refuse_unsafe(out: Path, flag: str) -> Path:
    resolved = out.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if resolved == Path(resolved.anchor):
        raise OutputError(f"{flag} {out} is the filesystem root; give a folder of its own")
    if resolved == home:
        raise OutputError(f"{flag} {out} is the home directory; give a folder of its own")
    if cwd == resolved or resolved in cwd.parents:
        what = "the working directory" if cwd == resolved else "an ancestor of the working directory"
        raise OutputError(f"{flag} {out} is {what}; give a folder of its own (e.g. {flag} {out / 'out'})")
    return resolved


def _probe_writable(out: Path, flag: str) -> None:
    """Create and remove a temporary folder where the output's temporary sibling will go (``os.access`` says yes
    to root on read-only mounts, so a real probe)."""
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=existing))
    except OSError:
        raise OutputError(f"{flag} {out}: cannot write there ({existing} is not a writable folder)") from None


def prepare_output(out: str | os.PathLike[str], *, force: bool = False, flag: str = "--out",
                   keep: bool = False) -> Path:
    """Check an output folder before any work; returns it as a Path (as given, not resolved). Creates nothing.

    Refused (:class:`OutputError`, exit 2, one line): ``/``, the home directory, the working directory or any of
    its ancestors, a symbolic link, an existing file, a folder holding anything laptop-deploy did not write (the
    message names it), a non-empty laptop-deploy folder without ``force`` (unless ``keep``: the caller continues
    the folder, e.g. ``distill --resume``), and a parent that cannot be written (probed).
    """
    out = as_path(out, what=flag)
    _refuse_unsafe(out, flag)
    if out.is_symlink():
        raise OutputError(f"{flag} {out} is a symbolic link; give the real folder path")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} is an existing file; give a folder path")
    if out.is_dir() and os.listdir(out):
        foreign = foreign_entries(out)
        if foreign:
            raise OutputError(f"{flag} {out} holds files laptop-deploy did not write ({_describe(foreign, out)}); "
                              f"choose a new or empty folder")
        if not force and not keep:
            raise OutputError(f"{flag} {out} is a non-empty folder; pass --force to replace it")
    _probe_writable(out, flag)
    return out


def delete_tree(path: Path) -> None:
    """Delete ``path`` without following symbolic links: a link is unlinked (its target untouched); links inside
    a folder are removed as links (``shutil.rmtree`` uses file descriptors on Linux for this)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def write_marker(folder: Path, *, kind: str, entries: Iterable[str] = ()) -> None:
    """Write the marker into ``folder``: the names now in it plus ``entries`` (names a later step will add)."""
    names = sorted((set(os.listdir(folder)) | set(entries)) - {MARKER})
    data = {"written_by": WRITTEN_BY, "kind": kind, "entries": names}
    (folder / MARKER).write_text(json.dumps(data, indent=2) + "\n")


def write_atomically(out: str | os.PathLike[str], write: Callable[[Path], Any], *, force: bool = False,
                     kind: str = "artifact", entries: Iterable[str] = (), flag: str = "--out") -> Path:
    """Call ``write(tmp)`` into a fresh temporary sibling of ``out``, add the marker, then replace ``out``
    (old renamed aside, new renamed in, old deleted). A failure in ``write`` leaves ``out`` as it was.

    ``out`` is checked again (:func:`prepare_output`): the folder may have changed during the compute.
    ``entries`` declares names a later step will add (a distillation run's checkpoints). Returns ``out``.
    """
    out = prepare_output(out, force=force, flag=flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-{_writer_tag()}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the artifact private to its writer
        write(tmp)
        write_marker(tmp, kind=kind, entries=entries)
        if out.is_dir():
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{_writer_tag()}-", dir=out.parent))
            os.replace(out, aside)  # replaces the empty placeholder folder atomically
            os.replace(tmp, out)
            delete_tree(aside)
        else:
            os.replace(tmp, out)
    except BaseException:
        if tmp.exists():
            delete_tree(tmp)
        raise
    return out


def sweep_leftovers(out: Path) -> list[Path]:
    """Remove the hidden ``.NAME.new-PID-HOST-*`` / ``.NAME.old-PID-HOST-*`` folders next to ``out`` written on this
    host by a process ``PID`` that no longer runs: what a laptop-deploy process killed mid-write left. A live
    writer's folder, another host's, a link, a file, or a name without that tag is left alone. Returns what was
    removed."""
    removed, host = [], _writer_tag().split("-")[1]
    for tag in (".new-", ".old-"):
        for sibling in sorted(out.parent.glob(f".{glob.escape(out.name)}{tag}*")):
            pid, _, rest = sibling.name[len(out.name) + 1 + len(tag):].partition("-")
            ours = pid.isdigit() and rest.startswith(host + "-") and sibling.is_dir() and not sibling.is_symlink()
            if ours and not _alive(int(pid)):
                delete_tree(sibling)
                removed.append(sibling)
    return removed


def _writer_tag() -> str:
    """``PID-HOST``: this process's id and a short hash of the host name, for temporary sibling names."""
    return f"{os.getpid()}-{hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def fresh_folder(out: str | os.PathLike[str], *, force: bool = False, kind: str, entries: Iterable[str],
                 flag: str = "--out") -> Path:
    """Replace ``out`` (atomically, as :func:`write_atomically`) by a folder holding only the marker, for a
    command that fills it step by step (a distillation run); ``entries`` are the names it will write."""
    return write_atomically(out, lambda tmp: None, force=force, kind=kind, entries=entries, flag=flag)


def prepare_output_file(out: str | os.PathLike[str], *, force: bool = False, flag: str = "--out",
                        suffix: str | None = None) -> Path:
    """Check an output *file* (an image) before any work, as :func:`prepare_output` does a folder: the suffix, not
    a folder or a link, an existing file only with ``force``, and a parent that can be written (probed; created
    by :func:`replace_file`). Returns it as a Path. Creates nothing."""
    out = as_path(out, what=flag)
    if out.is_symlink():
        raise OutputError(f"{flag} {out} is a symbolic link; give the real file path")
    if out.is_dir():
        raise OutputError(f"{flag} {out} is a folder; give a file path")
    if suffix and out.suffix.lower() != suffix:
        raise OutputError(f"{flag} {out}: write a {suffix} file")
    if out.exists() and not force:
        raise OutputError(f"{flag} {out} exists; pass --force to replace it")
    _probe_writable(out, flag)
    return out


def replace_file(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it over ``path``: a reader sees the
    old file or the new one, never half of one, and a failure leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.new-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600, as a plain open() would not have made it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's umask (read by setting and restoring it: there is no getter before Python 3.13's os API)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

