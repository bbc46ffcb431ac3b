"""Seeded fuzzing of the readers, many more cases than CI runs (tests/test_fuzz.py).

    python bench/fuzz.py [--files 3000] [--catalogs 100] [--seed 0]

Damaged SDSS files (random truncations, bit flips, header value edits) and damaged catalog
cells (-9999, NaN, empty, text). Every case must end as a kept row with the file's numbers
or a named reject; the first case that does not raises with its details. Then damaged lite
files (--fast of them) are read by both SDSS readers, the fast plain-layout reader and cfitsio:
they must give the same spectrum or the same reject reason. Prints the count of cases and
their outcomes.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_fuzz import check_catalog_cases, check_fast_reader_cases, check_spectrum_cases  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=3000, help="damaged spectrum files")
    ap.add_argument("--catalogs", type=int, default=100, help="damaged catalogs (6 rows each)")
    ap.add_argument("--fast", type=int, default=3000, help="damaged lite files read by both SDSS readers")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = check_spectrum_cases(Path(tmp) / "files", a.files, a.seed)
        t1 = time.perf_counter()
        cats = check_catalog_cases(Path(tmp) / "cats", a.catalogs, a.seed)
        t2 = time.perf_counter()
        fast = check_fast_reader_cases(Path(tmp) / "fast", a.fast, a.seed)
        t3 = time.perf_counter()
    print(f"{a.files} damaged spectrum files in {t1 - t0:.1f} s, all kept or named: "
          + ", ".join(f"{k} {v}" for k, v in sorted(files.items())))
    print(f"{a.catalogs} damaged catalogs ({sum(cats.values())} rows) in {t2 - t1:.1f} s, all kept or named: "
          + ", ".join(f"{k} {v}" for k, v in sorted(cats.items())))
    print(f"{a.fast} damaged lite files in {t3 - t2:.1f} s, fast reader and cfitsio agree on each: "
          + ", ".join(f"{k} {v}" for k, v in sorted(fast.items())))
    print(f"{a.files + a.catalogs + a.fast} fuzz cases passed (seed {a.seed})")


if __name__ == "__main__":
    main()
