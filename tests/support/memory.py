"""What Linux says about this process's memory (/proc/self): how much of a file it has mapped
in, for the tests of giving a weight file's pages back (formats/mapped.py)."""

import os

import pytest

LINUX_PROC = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")


def resident_kb(path) -> int:
    """kB of `path` this process has resident, over every mapping of it (/proc/self/smaps Rss)."""
    path, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split(None, 5)
            if "-" in fields[0]:  # a mapping's first line: range perms offset dev inode [path]
                inside = len(fields) == 6 and fields[5].rstrip("\n") == path
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total
