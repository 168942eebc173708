"""frame/pages.py: a real process drops its libraries' resident pages and keeps working
(the pages come back from the page cache as they are read)."""

from __future__ import annotations

import json
import subprocess
import sys

from addons.frame.pages import drop_library_pages, smaps_blocks

DROP_CHILD = """
import json, hashlib, ssl
from pathlib import Path
from addons.frame.pages import drop_library_pages
def files():
    return int(next(x for x in Path("/proc/self/status").read_text().splitlines()
                    if x.startswith("RssFile:")).split()[1])
ctx = ssl.create_default_context()   # libssl / libcrypto in use
before = files()
dropped = drop_library_pages()
after = files()
digest = hashlib.sha256(b"abc").hexdigest()   # and still working after
ctx2 = ssl.create_default_context()
print(json.dumps({"before": before, "after": after, "dropped": dropped, "digest": digest}))
"""


def test_drop_library_pages_in_a_real_process() -> None:
    out = subprocess.run([sys.executable, "-c", DROP_CHILD], capture_output=True, text=True,
                         timeout=60, check=True)
    r = json.loads(out.stdout)
    assert r["digest"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert r["dropped"] > 1024, r
    assert r["after"] < r["before"] - 1024, r


def test_dropping_pages_of_no_library_changes_nothing() -> None:
    assert drop_library_pages("no-such-library-anywhere") == 0


def test_smaps_blocks_reads_mappings_and_fields() -> None:
    text = ("7f00-7f10 r-xp 00000000 08:01 42 /usr/lib/libx.so\n"
            "Size:                 64 kB\nRss:                  12 kB\n"
            "Anonymous:             0 kB\nVmFlags: rd ex mr mw me\n"
            "7f10-7f20 rw-p 00000000 00:00 0 \nRss:                   4 kB\n")
    blocks = smaps_blocks(text)
    assert [b[0].split()[-1] for b in blocks] == ["/usr/lib/libx.so", "0"]
    assert blocks[0][1] == {"Size": 64, "Rss": 12, "Anonymous": 0}
    assert blocks[1][1] == {"Rss": 4}
