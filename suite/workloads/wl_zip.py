"""zip: compress a generated folder (64 files, 4 MiB of text) into an in-memory zip archive."""
import io
import os
import random
import shutil
import zipfile

NFILES = 64
WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua 0 1 2 3 4 5 6 7 8 9").split()


def _generate(root):
    tmp = root + ".tmp%d" % os.getpid()
    os.makedirs(tmp)
    rng = random.Random(6)
    for i in range(NFILES):
        words = [rng.choice(WORDS) for _ in range(11000)]
        with open(os.path.join(tmp, "file%03d.txt" % i), "w") as f:
            f.write(" ".join(words))
    try:
        os.rename(tmp, root)
    except OSError:  # another process generated it first
        shutil.rmtree(tmp)


def init(arg):
    root = os.path.join(os.environ.get("SUITE_DATA", "/tmp"), "zipsrc")
    if not os.path.isdir(root):
        _generate(root)
    return root, sorted(os.listdir(root))


def handler(state):
    root, names = state
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                data = f.read()
            z.writestr(zipfile.ZipInfo(n, date_time=(2020, 1, 1, 0, 0, 0)), data, compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()
