#!/usr/bin/env python3
"""Where the event loop's time goes, from `py-spy record --native -f raw` stacks of a sidecar.

    py-spy record --native -r 250 -d 12 -f raw -o /tmp/sidecar.raw -p PID   # under load
    python3 bench/pyspy_top.py /tmp/sidecar.raw

Only the main thread (the event loop) counts; samples idle in epoll are counted apart. A busy
sample is charged to its innermost Python function, C work it calls included (a socket system
call at the leaf is charged to the kernel, a sample with no Python frame to uvloop/libuv).
Printed: shares by package, the top functions, and the inclusive shares of the busiest frames.
"""

from __future__ import annotations

import argparse
import collections
import re

RUNNER = {"_run_module_as_main", "_run_code", "<module>", "main", "cmd_run", "_run_loop", "Runner.run",
          "run_until_complete", "run_forever"}
SYSCALLS = {"read", "write", "writev", "send", "sendmsg", "recv", "recvmsg", "accept4", "close", "epoll_ctl", "ioctl"}
PACKAGES = ("aiohttp", "sidecar", "asyncio", "multidict", "yarl", "logging")
FRAME = re.compile(r"(.*) \((.*\.py|<frozen [^>]*>):\d+\)$")


def package(path: str) -> str:
    return next((p for p in PACKAGES if f"{p}/" in path), path.rsplit("/", 1)[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", help="py-spy record -f raw output")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    inner: collections.Counter[tuple[str, str]] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[tuple[str, str]] = collections.Counter()
    busy = idle = 0
    with open(args.raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if "_run_module_as_main" not in stack:
                continue  # another thread (access log writer, workers)
            n = int(count)
            frames = stack.split(";")
            leaf = frames[-1].split(" (")[0]
            if leaf in ("epoll_wait", "epoll_pwait"):
                idle += n
                continue
            busy += n
            py = [(m.group(1), m.group(2)) for fr in frames if (m := FRAME.match(fr)) and m.group(1) not in RUNNER]
            if leaf in SYSCALLS:
                key, pkg = (f"(system call {leaf})", ""), "kernel (socket system calls)"
            elif not py:
                key, pkg = ("(uvloop/libuv, no Python frame)", ""), "uvloop/libuv"
            else:
                key, pkg = py[-1], package(py[-1][1])
            inner[key] += n
            packages[pkg] += n
            for frame in set(py):
                inclusive[frame] += n
    print(f"{busy} busy samples of the event loop's thread, {idle} idle in epoll")
    print("by package:", ", ".join(f"{k} {100 * v / busy:.1f}%" for k, v in packages.most_common()))
    print("top functions (self, with the C they call):")
    for (fn, path), n in inner.most_common(args.top):
        print(f"  {100 * n / busy:5.1f}%  {fn}  {path.rsplit('site-packages/', 1)[-1]}")
    print("inclusive:")
    for (fn, path), n in inclusive.most_common(args.top):
        print(f"  {100 * n / busy:5.1f}%  {fn}  {path.rsplit('site-packages/', 1)[-1]}")


if __name__ == "__main__":
    main()
