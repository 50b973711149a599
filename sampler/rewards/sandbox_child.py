"""Runs inside the sandbox subprocess (never imported by the sampler): `python -I -S sandbox_child.py PROGRAM`.

Reads the program, then installs an audit hook (which Python code cannot remove) that refuses:
opening files outside the working directory (reads of the interpreter's own library are allowed,
so imports work), changing files or directories outside it, starting processes, sockets, ctypes
and the gc introspection that could reach the hook. The parent adds rlimits and a wall-clock kill.
"""

import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
REFUSED_PREFIXES = (
    "subprocess.",
    "os.exec",
    "os.spawn",
    "os.posix_spawn",
    "os.fork",
    "os.forkpty",
    "pty.",
    "socket.",
    "ctypes.",
    "winreg.",
    "_winapi.",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
    "gc.get_referrers",
    "gc.get_referents",
    "gc.get_objects",
    "os.system",
    "os.putenv",
    "os.unsetenv",
    "os.chroot",
    "os.setuid",
    "resource.setrlimit",
    "urllib.",
    "http.",
    "sys.remote_exec",
)
# Events whose first argument is a path that must stay inside the working directory.
PATH_EVENTS = {
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "os.rename",
    "os.chmod",
    "os.chown",
    "os.truncate",
    "os.link",
    "os.symlink",
    "os.utime",
    "os.chdir",
    "os.chflags",
    "os.setxattr",
    "os.removexattr",
    "shutil.rmtree",
    "shutil.copyfile",
    "shutil.copytree",
    "shutil.move",
    "os.mkfifo",
    "os.mknod",
}
TWO_PATH_EVENTS = {"os.rename", "os.link", "os.symlink", "shutil.copyfile", "shutil.copytree", "shutil.move"}
# Listing is allowed in the library too: the import system lists package directories.
LIST_EVENTS = {"os.listdir", "os.scandir", "glob.glob", "os.walk"}


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def main() -> None:
    workdir = os.path.realpath(os.getcwd())
    with open(sys.argv[1]) as f:
        program = f.read()
    library = [os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)]
    library += [os.path.realpath(os.path.join(sys.base_prefix, "lib"))]
    realpath, fsdecode = os.path.realpath, os.fsdecode

    def check_path(event: str, path: object, roots: list[str]) -> None:
        if isinstance(path, int) or path is None:
            return
        p = realpath(fsdecode(path))
        if not any(_inside(p, root) for root in roots):
            raise PermissionError(f"sandbox: {event} on {path!r} outside the working directory refused")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, 0))[:3]
            if isinstance(path, int) or path is None:
                return
            p = realpath(fsdecode(path))
            writing = bool((flags or 0) & WRITE_FLAGS) or any(c in (mode or "") for c in "wax+")
            if _inside(p, workdir) or (not writing and any(_inside(p, root) for root in library)):
                return
            raise PermissionError(f"sandbox: open({path!r}, {mode!r}) refused")
        if event.startswith(REFUSED_PREFIXES):
            raise PermissionError(f"sandbox: {event} refused")
        if event in LIST_EVENTS:
            check_path(event, args[0] if args else ".", [workdir] + library)
        if event in PATH_EVENTS:
            for path in args[:2] if event in TWO_PATH_EVENTS else args[:1]:
                check_path(event, path, [workdir])

    code = compile(program, "<solution>", "exec")
    sys.addaudithook(hook)
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
