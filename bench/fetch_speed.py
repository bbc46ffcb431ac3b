"""Download speed of `fetch`: acquire.download from a local http.server on 127.0.0.1.

Prints files/s and MB/s at concurrency 1 and 8, the cost of a re-run (every file present and
verified), and the per-file FITS check.

    .venv/bin/python bench/fetch_speed.py [N=500]
"""
import functools
import shutil
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import numpy as np
import pandas as pd

from stellarparams.acquire import download, sas_path, check_spectrum_file
from stellarparams.surveys.sdss import write_spec_lite

N = int(sys.argv[1]) if len(sys.argv) > 1 else 500
tmp = Path(tempfile.mkdtemp())
root = tmp / "sas"
rng = np.random.default_rng(0)
rows = []
loglam = 3.5800 + 1e-4 * np.arange(3850)  # a typical SDSS lite spectrum length
t = time.perf_counter()
for i in range(N):
    plate, mjd, fiber = 266 + i // 640, 51602, 1 + i % 640
    write_spec_lite(root / sas_path(plate, mjd, fiber, "26"), loglam, 50 + rng.normal(0, 1, 3850), np.full(3850, 4.0),
                    plate=plate, mjd=mjd, fiberid=fiber)
    rows.append((plate, mjd, fiber, "26"))
print(f"wrote {N} files in {time.perf_counter() - t:.1f} s, {(root / sas_path(*rows[0])).stat().st_size / 1e3:.0f} kB each")

class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
threading.Thread(target=srv.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{srv.server_address[1]}/"
cat = pd.DataFrame(rows, columns=["PLATE", "MJD", "FIBERID", "RUN2D"])
for conc in (1, 8):
    out = tmp / f"out{conc}"
    s = download(cat, out, url, concurrency=conc, progress=False)
    print(f"concurrency {conc}: {s['downloaded']} files in {s['seconds']:.2f} s = {s['downloaded'] / s['seconds']:.0f} files/s, {s['mb_per_s']:.1f} MB/s, failed {s['failed']}")
s = download(cat, tmp / "out8", url, concurrency=8, progress=False)
print(f"re-run (all present, each verified): {s['present']} files in {s['seconds']:.2f} s = {s['present'] / s['seconds']:.0f} files/s")
f = tmp / "out8" / "spectra"
files = sorted(f.glob("*.fits"))
t = time.perf_counter()
for p in files:
    assert check_spectrum_file(p) is None
print(f"check_spectrum_file: {(time.perf_counter() - t) / len(files) * 1e3:.2f} ms per file (1 thread)")
srv.shutdown()
shutil.rmtree(tmp)
