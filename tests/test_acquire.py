"""`fetch` against a local fake of SkyServer + the SAS (http.server on 127.0.0.1; no internet)."""
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from stellarparams import acquire
from stellarparams.acquire import (CatalogQueryError, build_query, check_spectrum_file, download, fetch,
                                   parse_skyserver_csv, query_catalog, sas_path)
from stellarparams.surveys.sdss import read_spectrum, spec_filename, write_spec_lite

pytestmark = pytest.mark.timeout(60)

HEADER = ("SPECOBJID,PLATE,MJD,FIBERID,RUN2D,CLASS,SCIENCEPRIMARY,ZWARNING,TEFFADOP,TEFFADOPUNC,FEHADOP,"
          "FEHADOPUNC,LOGGADOP,LOGGADOPUNC,ELODIERVFINAL,ELODIERVFINALERR,SNR,FLAG")
# plate, mjd, fiber, run2d, teff, feh, logg, rv, snr  (two rows fail the cuts: -9999 Teff, S/N 5)
STARS = [
    (266, 51602, 1, "26", 5800.0, -0.5, 4.2, -35.5, 25.0),
    (266, 51602, 7, "26", 6100.0, -1.2, 4.0, 12.0, 40.0),
    (1960, 53289, 12, "103", 4800.0, 0.1, 2.5, 110.0, 18.0),
    (2887, 54521, 300, "104", 9000.0, -2.0, 3.5, -210.0, 15.0),
    (3586, 55181, 45, "v5_7_0", 5200.0, -0.3, 4.6, 5.0, 30.0),
    (3587, 55182, 46, "v5_7_0", 7000.0, -0.8, 4.1, 55.0, 22.0),
    (3588, 55183, 47, "v5_7_0", 4500.0, -1.5, 1.5, -80.0, 12.0),
    (266, 51602, 9, "26", -9999.0, -9999.0, -9999.0, 3.0, 30.0),
    (266, 51602, 11, "26", 6000.0, -0.2, 4.3, 3.0, 5.0),
]


def specobjid(plate, fiber):
    return plate * 10**6 + fiber


def csv_row(plate, mjd, fiber, run2d, teff, feh, logg, rv, snr):
    return (f"{specobjid(plate, fiber)},{plate},{mjd},{fiber},{run2d},STAR,1,0,{teff},50.5,{feh},0.05,{logg},0.1,"
            f"{rv},1.5,{snr},nnnnn")


class FakeSDSS:
    """SkyServer SqlSearch (canned CSV, honours TOP and 'specObjID > N') + a SAS-like file tree.

    ``actions[path]`` is a list consumed one per request: "500", "503-retry-after",
    "429-retry-after-7", "trunc",
    "404"; afterwards (or when empty) the file is served, honouring Range requests. Time-outs
    are not made by waiting: :func:`timing_out` injects them into the client.
    """

    def __init__(self, root: Path, rows):
        self.root, self.rows = root, sorted(rows, key=lambda r: int(r.split(",")[0]))
        self.requests, self.queries, self.range_requests = Counter(), [], []
        self.actions, self.sql_error = {}, None
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                fake.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def reset(self):
        with self.lock:
            self.requests.clear()
            self.queries.clear()
            self.range_requests.clear()

    def send(self, h, code, body: bytes, headers=()):
        h.send_response(code)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def handle(self, h):
        u = urlparse(h.path)
        if u.path.endswith("/SqlSearch"):
            sql = parse_qs(u.query)["cmd"][0]
            with self.lock:
                self.queries.append(sql)
            if self.sql_error:
                code, text = self.sql_error
                return self.send(h, code, text.encode(), [("Content-Type", "text/html")])
            top = re.search(r"TOP (\d+)", sql)
            after = re.search(r"specObjID > (\d+)", sql)
            rows = [r for r in self.rows if after is None or int(r.split(",")[0]) > int(after.group(1))]
            rows = rows[: int(top.group(1))] if top else rows
            return self.send(h, 200, ("#Table1\n" + HEADER + "\n" + "".join(r + "\n" for r in rows)).encode())
        with self.lock:
            self.requests[u.path] += 1
            todo = self.actions.get(u.path)
            action = todo.pop(0) if todo else "ok"
            if h.headers.get("Range"):
                self.range_requests.append((u.path, h.headers["Range"]))
        f = self.root / u.path.lstrip("/")
        if action == "500":
            return self.send(h, 500, b"<html>Internal Server Error</html>")
        if action == "503-retry-after":
            return self.send(h, 503, b"busy", [("Retry-After", "0")])
        if action == "429-retry-after-7":
            return self.send(h, 429, b"slow down", [("Retry-After", "7")])
        if action == "404" or not f.is_file():
            return self.send(h, 404, b"not found")
        data = f.read_bytes()
        if action == "trunc":  # announce the whole file, send half, hang up
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            return
        m = re.match(r"bytes=(\d+)-$", h.headers.get("Range", ""))
        if m and int(m.group(1)) < len(data):
            start = int(m.group(1))
            return self.send(h, 206, data[start:], [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")])
        return self.send(h, 200, data)


def write_tree(root: Path, stars, boss_run2d_override=None):
    rng = np.random.default_rng(0)
    for plate, mjd, fiber, run2d, *_ in stars:
        run2d = (boss_run2d_override or run2d) if run2d.startswith("v") else run2d
        loglam = 3.58 + 1e-4 * np.arange(300)
        flux = 50 + rng.normal(0, 1, 300)
        write_spec_lite(root / sas_path(plate, mjd, fiber, run2d), loglam, flux, np.full(300, 4.0),
                        plate=plate, mjd=mjd, fiberid=fiber)


@pytest.fixture
def sdss(tmp_path, monkeypatch):
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    root = tmp_path / "sas"
    write_tree(root, STARS)
    fake = FakeSDSS(root, [csv_row(*s) for s in STARS])
    yield fake
    fake.close()


def timing_out(paths):
    """A urllib3 PoolManager whose connections time out reading the answer to each request in
    ``paths`` (a Counter: path -> how many times): the request reaches the server, the client
    sees a read time-out, as if the answer never came. No clock is involved."""
    import socket

    import urllib3
    from urllib3.connectionpool import HTTPConnectionPool

    lock = threading.Lock()

    class Conn(urllib3.connection.HTTPConnection):
        def request(self, method, url, *a, **kw):
            self._path = urlparse(url).path
            return super().request(method, url, *a, **kw)

        def getresponse(self, *a, **kw):
            with lock:
                hang = paths[self._path] > 0
                paths[self._path] -= hang
            if hang:
                raise socket.timeout("timed out")
            return super().getresponse(*a, **kw)

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

    http = urllib3.PoolManager(maxsize=4)
    http.pool_classes_by_scheme = {"http": Pool}
    return http


def sql_url(fake):
    return fake.url + "/dr12/SkyServerWS/SearchTools/SqlSearch"


def spectrum_path(plate, mjd, fiber, run2d):
    return "/" + sas_path(plate, mjd, fiber, run2d)


GOOD = STARS[:7]
FAST = dict(progress=False, timeout=2.0, backoff=0.01)


# ----------------------------------------------------------------------------- query text, paths, parsing


def test_query_text_carries_the_cuts():
    q = build_query(100, min_snr=20, teff_range=(4500, 7000), feh_range=(-2.5, 0.5), after_specobjid=123456)
    assert q.startswith("SELECT TOP 100 ")
    for part in ("p.snr >= 20", "p.teffadop BETWEEN 4500 AND 7000", "p.fehadop BETWEEN -2.5 AND 0.5",
                 "p.teffadop != -9999", "p.fehadop != -9999", "p.loggadop != -9999", "p.elodiervfinalerr > 0",
                 "s.sciencePrimary = 1", "s.specObjID > 123456", "ORDER BY s.specObjID",
                 "JOIN specObjAll AS s ON s.specObjID = p.specObjID", "p.elodiervfinal AS ELODIERVFINAL",
                 "s.run2d AS RUN2D"):
        assert part in q, part
    q2 = build_query(None, min_snr=10, teff_range=None, primary_only=False)
    where = q2.split("WHERE")[1]
    assert not q2.startswith("SELECT TOP") and "BETWEEN" not in where and "sciencePrimary" not in where
    assert "p.snr >= 10" in where
    with pytest.raises(ValueError, match="range"):
        build_query(5, teff_range=(9000, 4000))


def test_sas_paths_for_sdss_and_boss():
    assert sas_path(266, 51602, 1, "26") == "dr12/sdss/spectro/redux/26/spectra/lite/0266/spec-0266-51602-0001.fits"
    assert sas_path(2887, 54521, 300, "104").startswith("dr12/sdss/spectro/redux/104/spectra/lite/2887/")
    assert sas_path(3586, 55181, 45, "v5_7_0", lite=False) == \
        "dr12/boss/spectro/redux/v5_7_0/spectra/3586/spec-3586-55181-0045.fits"
    urls = acquire.sas_urls("http://m/sas", 3586, 55181, 45, "")  # RUN2D unknown: every reduction, BOSS first
    assert len(urls) == 5 and "/v5_7_0/" in urls[0] and urls[0].startswith("http://m/sas/dr12/boss/")


def test_skyserver_csv_and_error_pages():
    df = parse_skyserver_csv("#Table1\n" + HEADER + "\n" + csv_row(*STARS[0]) + "\n")
    assert len(df) == 1 and df.loc[0, "TEFFADOP"] == 5800.0 and df.loc[0, "SPECOBJID"] == str(specobjid(266, 1))
    assert parse_skyserver_csv("#Table1\n" + HEADER + "\n").empty
    sdss_only = parse_skyserver_csv("#Table1\n" + HEADER.lower() + "\n" + csv_row(*STARS[2]) + "\n")
    assert sdss_only.loc[0, "RUN2D"] == "103" and sdss_only.loc[0, "PLATE"] == 1960  # RUN2D stays text
    with pytest.raises(CatalogQueryError, match="Invalid column name 'teffadopx'"):
        parse_skyserver_csv("<html><body><h1>Error</h1><p>Invalid column name 'teffadopx'.</p></body></html>")
    with pytest.raises(CatalogQueryError, match="ERROR"):
        parse_skyserver_csv("ERROR: The query timed out\n")


# ----------------------------------------------------------------------------- catalog query


def test_query_catalog_pages_by_specobjid(sdss):
    df = query_catalog(sql_url(sdss), None, page_size=4, progress=False, min_snr=10, teff_range=(4000, 9500))
    assert len(sdss.queries) == 3  # 4 + 4 + 1 rows, the last page short
    assert "specObjID >" not in sdss.queries[0] and f"specObjID > {specobjid(266, 11)}" in sdss.queries[1]
    assert all("TOP 4 " in q for q in sdss.queries) and all("p.snr >= 10" in q for q in sdss.queries)
    assert len(df) == len(GOOD) and df["SPECOBJID"].is_monotonic_increasing and df["SPECOBJID"].is_unique
    assert {"TEFF_ADOP", "FEH_ADOP_UNC", "LOGG_ADOP", "RV_ADOP", "RV_ADOP_ERR", "FIBERID", "RUN2D"} <= set(df)
    assert "TEFFADOP" not in df and df["PLATE"].dtype == np.int64
    sdss.reset()
    df = query_catalog(sql_url(sdss), 6, page_size=4, progress=False)
    # page 1 holds the two rows that fail the cuts, so 4 more are asked for
    assert len(df) == 6 and len(sdss.queries) == 2 and all("TOP 4 " in q for q in sdss.queries)
    df = query_catalog(sql_url(sdss), 1, page_size=4, progress=False)
    assert len(df) == 1 and "TOP 1 " in sdss.queries[-1]


def test_query_errors_are_clear_and_retried_on_5xx(sdss):
    sdss.sql_error = (500, "<html><body>Error: Invalid column name 'teffadop'. Query failed.</body></html>")
    with pytest.raises(CatalogQueryError, match=r"3 attempt.*HTTP 500: Error: Invalid column name 'teffadop'"):
        query_catalog(sql_url(sdss), 3, retries=2, backoff=0.01, progress=False)
    assert len(sdss.queries) == 3
    sdss.reset()
    sdss.sql_error = (200, "<html><body>Error: Maximum query time exceeded</body></html>")
    with pytest.raises(CatalogQueryError, match="Maximum query time exceeded"):
        query_catalog(sql_url(sdss), 3, retries=2, backoff=0.01, progress=False)
    assert len(sdss.queries) == 1


def test_cli_query_error_exits_2_with_one_line(sdss, tmp_path, capsys):
    """The command raises; cli.main turns the service's error into exit 2 and one line, not a traceback."""
    from stellarparams.cli import main

    sdss.sql_error = (200, "<html><body>Error: Maximum query time exceeded</body></html>")
    out = tmp_path / "out"
    rc = main(["fetch", "--n", "3", "--out", str(out), "--sql-url", sql_url(sdss), "--sas-url", sdss.url,
               "--retries", "0", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Maximum query time exceeded" in err
    assert not (out / "catalog.parquet").exists() and not (out / "fetch.json").exists()


# ----------------------------------------------------------------------------- whole fetch


def test_full_fetch_then_rerun_skips_everything(sdss, tmp_path):
    out = tmp_path / "out"
    s = fetch(10, out, sql_url=sql_url(sdss), sas_url=sdss.url + "/", sample="first", concurrency=3, **FAST)
    assert s["catalog"]["rows"] == len(GOOD)  # the -9999 and S/N 5 rows are cut
    assert s["spectra"]["downloaded"] == len(GOOD) and s["spectra"]["failed"] == 0
    cat = pd.read_parquet(out / "catalog.parquet")
    with fits.open(out / "catalog.fits") as h:
        fcat = h[1].data
        assert h[1].header["SPVERS"] and h[1].header["SOURCE"] == "skyserver"
    assert list(cat["FIBERID"]) == [s[2] for s in sorted(GOOD, key=lambda s: specobjid(s[0], s[2]))]
    assert np.allclose(np.sort(fcat["TEFF_ADOP"]), np.sort([s[4] for s in GOOD]))
    row = cat[cat["FIBERID"] == 45].iloc[0]
    assert row["RV_ADOP"] == 5.0 and row["RV_ADOP_ERR"] == 1.5 and row["RUN2D"] == "v5_7_0" and row["CLASS"] == "STAR"
    assert all(f.startswith("spectra/spec-") for f in cat["FILE"])  # relative to the catalog's folder
    for f in cat["FILE"]:
        sp = read_spectrum(out / f)
        assert sp.objclass == "STAR" and len(sp.flux) == 300
    assert (out / "failures.csv").read_text().strip() == "file,url,reason,attempts"
    meta = json.loads((out / "fetch.json").read_text())
    assert meta["status"] == "done" and meta["stellarparams_version"] and "p.snr >= 10" in meta["query"]
    assert sum(sdss.requests.values()) == len(GOOD)

    sdss.reset()
    s2 = fetch(10, out, sql_url=sql_url(sdss), sas_url=sdss.url + "/", sample="first", concurrency=3, **FAST)
    assert s2["catalog"]["reused"] and s2["spectra"]["present"] == len(GOOD) and s2["spectra"]["downloaded"] == 0
    assert sdss.queries == [] and sum(sdss.requests.values()) == 0


def test_random_sample_is_seeded_and_cuts_apply(sdss, tmp_path):
    a = fetch(3, tmp_path / "a", sql_url=sql_url(sdss), sas_url=sdss.url, spectra=False, seed=1, progress=False)
    b = fetch(3, tmp_path / "b", sql_url=sql_url(sdss), sas_url=sdss.url, spectra=False, seed=1, progress=False)
    assert a["catalog"]["rows"] == b["catalog"]["rows"] == 3 and "spectra" not in a
    ca, cb = (pd.read_parquet(tmp_path / d / "catalog.parquet") for d in "ab")
    assert ca["SPECOBJID"].tolist() == cb["SPECOBJID"].tolist()
    c = fetch(7, tmp_path / "c", sql_url=sql_url(sdss), sas_url=sdss.url, spectra=False, teff_range=(5000, 6500),
              min_snr=20, progress=False)
    cc = pd.read_parquet(tmp_path / "c" / "catalog.parquet")
    assert c["catalog"]["rows"] == 3 and cc["TEFF_ADOP"].between(5000, 6500).all() and (cc["SNR"] >= 20).all()
    assert "p.teffadop BETWEEN 5000 AND 6500" in sdss.queries[-1] and "p.snr >= 20" in sdss.queries[-1]


def test_killed_run_resumes_with_only_the_missing_files(sdss, tmp_path):
    out = tmp_path / "out"
    done = []

    def kill_after_two(r):
        done.append(r)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch(10, out, sql_url=sql_url(sdss), sas_url=sdss.url, sample="first", concurrency=1,
              on_file=kill_after_two, **FAST)
    assert json.loads((out / "fetch.json").read_text())["status"].startswith("interrupted")
    cat = pd.read_parquet(out / "catalog.parquet")
    complete = {Path(f).name for f in cat["FILE"] if check_spectrum_file(out / f) is None}
    assert 2 <= len(complete) <= 3 < len(cat)  # the one in flight may or may not have finished
    missing = {spectrum_path(s[0], s[1], s[2], s[3]) for s in GOOD
               if spec_filename(s[0], s[1], s[2]) not in complete}

    sdss.reset()
    s = fetch(10, out, sql_url=sql_url(sdss), sas_url=sdss.url, sample="first", concurrency=3, **FAST)
    assert set(sdss.requests) == missing and all(v == 1 for v in sdss.requests.values())
    assert s["spectra"]["downloaded"] == len(missing) and s["spectra"]["present"] == len(complete)
    assert s["spectra"]["failed"] == 0 and sdss.queries == []  # the catalog was kept


def test_retries_then_manifest_of_persistent_failures(sdss, tmp_path):
    p = {i: spectrum_path(*GOOD[i][:4]) for i in range(len(GOOD))}
    sdss.actions = {p[0]: ["500", "500"],  # recovers on the 3rd attempt
                    p[1]: ["500"] * 10,  # persistent 5xx
                    p[3]: ["trunc"],  # one short body, resumed with a Range request
                    p[4]: ["trunc"] * 10,  # always short
                    p[5]: ["404"],  # not on the server: no retry
                    p[6]: ["503-retry-after"]}  # busy, says when to come back: honoured, then fine
    hangs = Counter({p[2]: 1})  # one time-out, then fine
    cat = pd.DataFrame(GOOD, columns=["PLATE", "MJD", "FIBERID", "RUN2D", "T", "F", "G", "R", "S"])
    out = tmp_path / "out"
    s = download(cat, out, sdss.url, concurrency=4, retries=2, timeout=30, backoff=0.01, progress=False,
                 http=timing_out(hangs))
    assert s["downloaded"] == 4 and s["failed"] == 3
    assert s["failed_by_reason"] == {"http_500": 1, "truncated": 1, "http_404": 1}
    fails = pd.read_csv(out / "failures.csv")
    by_file = {Path(f).name: (r, a) for f, r, a in zip(fails["file"], fails["reason"], fails["attempts"])}
    reason, attempts = by_file[spec_filename(*GOOD[1][:3])]
    assert reason.startswith("http_500") and attempts == 3
    assert "truncated" in by_file[spec_filename(*GOOD[4][:3])][0]
    assert by_file[spec_filename(*GOOD[5][:3])] == ("http_404 not found", 1)
    assert sdss.requests[p[0]] == 3 and sdss.requests[p[1]] == 3 and sdss.requests[p[5]] == 1
    assert sdss.requests[p[2]] == 2 and sdss.requests[p[3]] == 2 and sdss.requests[p[6]] == 2
    assert hangs[p[2]] == 0  # the time-out happened
    assert any(path == p[3] for path, _ in sdss.range_requests)  # the short body was continued
    for i in (0, 2, 3, 6):
        assert check_spectrum_file(out / "spectra" / spec_filename(*GOOD[i][:3])) is None
    for i in (1, 4, 5):
        assert not (out / "spectra" / spec_filename(*GOOD[i][:3])).exists()
    # the server recovers: a re-run fetches just the three failures
    sdss.reset()
    sdss.actions = {}
    s2 = download(cat, out, sdss.url, concurrency=4, retries=2, timeout=30, backoff=0.01, progress=False)
    assert s2["downloaded"] == 3 and s2["present"] == 4 and s2["failed"] == 0
    assert set(sdss.requests) == {p[1], p[4], p[5]}
    assert (out / "failures.csv").read_text().strip() == "file,url,reason,attempts"


def test_corrupt_and_partial_files_are_fetched_again(sdss, tmp_path):
    cat = pd.DataFrame(GOOD, columns=["PLATE", "MJD", "FIBERID", "RUN2D", "T", "F", "G", "R", "S"])
    out = tmp_path / "out"
    download(cat, out, sdss.url, concurrency=2, **FAST)
    files = [out / "spectra" / spec_filename(*s[:3]) for s in GOOD]
    full = files[2].read_bytes()
    files[0].write_bytes(b"\0" * 2880 * 3)  # right size granularity, not FITS
    files[1].write_bytes(files[1].read_bytes()[:2880 * 2])  # cut at a block boundary
    files[2].unlink()  # an interrupted download left a partial file
    files[2].with_name(files[2].name + ".part").write_bytes(full[:5000])
    assert check_spectrum_file(files[0]) and check_spectrum_file(files[1])
    sdss.reset()
    s = download(cat, out, sdss.url, concurrency=2, **FAST)
    assert s["downloaded"] == 3 and s["present"] == len(GOOD) - 3 and s["failed"] == 0
    assert set(sdss.requests) == {spectrum_path(*GOOD[i][:4]) for i in range(3)}
    assert sdss.range_requests == [(spectrum_path(*GOOD[2][:4]), "bytes=5000-")]
    assert files[2].read_bytes() == full and not files[2].with_name(files[2].name + ".part").exists()
    assert all(check_spectrum_file(f) is None for f in files)


def test_sas_fits_source_and_unknown_run2d(tmp_path, monkeypatch):
    for k in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(k, raising=False)
    root = tmp_path / "sas"
    write_tree(root, GOOD, boss_run2d_override="v5_7_2")  # BOSS files only under v5_7_2
    stars = GOOD + [STARS[7]]
    cols = [fits.Column("SPECOBJID", "22A", array=[str(specobjid(s[0], s[2])) for s in stars]),
            fits.Column("PLATE", "I", array=[s[0] for s in stars]),
            fits.Column("MJD", "J", array=[s[1] for s in stars]),
            fits.Column("FIBER", "I", array=[s[2] for s in stars]),
            fits.Column("RUN2D", "3A", array=[s[3][:3] for s in stars]),  # 'v5_': too short for BOSS names
            fits.Column("SPECPRIMARY", "J", array=[1] * len(stars)),
            fits.Column("FLAG", "5A", array=["nnnnn"] * len(stars))]
    for name, k in (("TEFF_ADOP", 4), ("FEH_ADOP", 5), ("LOGG_ADOP", 6), ("RV_ADOP", 7), ("SNR", 8)):
        cols.append(fits.Column(name, "E", array=[s[k] for s in stars]))
    for name in ("TEFF_ADOP_UNC", "FEH_ADOP_UNC", "LOGG_ADOP_UNC", "RV_ADOP_UNC"):
        cols.append(fits.Column(name, "E", array=[0.5] * len(stars)))
    sspp = root / acquire.SSPP_FITS_PATH
    sspp.parent.mkdir(parents=True)
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(sspp)
    fake = FakeSDSS(root, [])
    try:
        out = tmp_path / "out"
        s = fetch(10, out, sas_url=fake.url, source="sas-fits", sample="first", concurrency=2, **FAST)
        assert fake.requests["/" + acquire.SSPP_FITS_PATH] == 1
        cat = pd.read_parquet(out / "catalog.parquet")
        assert s["catalog"]["rows"] == len(GOOD) and s["spectra"]["failed"] == 0  # the -9999 row is cut
        assert {"FIBERID", "RV_ADOP_ERR", "SCIENCEPRIMARY"} <= set(cat) and "FIBER" not in cat
        assert set(cat.loc[cat["PLATE"] >= 3586, "RUN2D"]) == {""}
        boss = spectrum_path(3586, 55181, 45, "v5_7_0")
        assert fake.requests[boss] == 1 and fake.requests[boss.replace("v5_7_0", "v5_7_2")] == 1
    finally:
        fake.close()


def test_cli_fetch(sdss, tmp_path, capsys):
    from stellarparams.cli import main

    out = tmp_path / "cli"
    rc = main(["fetch", "--n", "4", "--out", str(out), "--sql-url", sql_url(sdss), "--sas-url", sdss.url,
               "--sample", "first", "--teff-range", "4000,9500", "--quiet", "--concurrency", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and "catalog: 4 stars" in text and "4 of 4 on disk" in text
    assert len(list((out / "spectra").glob("spec-*.fits"))) == 4
    sdss.actions = {spectrum_path(*GOOD[4][:4]): ["404"]}
    rc = main(["fetch", "--n", "5", "--out", str(out), "--sql-url", sql_url(sdss), "--sas-url", sdss.url,
               "--sample", "first", "--quiet", "--retries", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "http_404: 1" in err and "failures.csv" in err
    assert main(["fetch", "--n", "3", "--out", str(out), "--teff-range", "4000", "--quiet"]) == 2
    assert "LOW,HIGH" in capsys.readouterr().err


def test_catalog_and_spectra_feed_prepare(tmp_path, monkeypatch):
    from stellarparams.prepare import prepare

    monkeypatch.delenv("http_proxy", raising=False)
    root = tmp_path / "sas"
    rng = np.random.default_rng(1)
    loglam = 3.5800 + 1e-4 * np.arange(3850)  # the full SDSS range, as in a real lite file
    for plate, mjd, fiber, run2d, *_ in GOOD[:4]:
        write_spec_lite(root / sas_path(plate, mjd, fiber, run2d), loglam, 50 + rng.normal(0, 1, loglam.size),
                        np.full(loglam.size, 4.0), plate=plate, mjd=mjd, fiberid=fiber)
    fake = FakeSDSS(root, [csv_row(*s) for s in STARS[:4] + STARS[7:]])
    try:
        out = tmp_path / "out"
        fetch(10, out, sql_url=sql_url(fake), sas_url=fake.url, sample="first", concurrency=2, **FAST)
    finally:
        fake.close()
    for cat in ("catalog.parquet", "catalog.fits"):
        s = prepare(out / cat, out / "spectra", tmp_path / ("ds_" + cat.split(".")[1]), workers=1, progress=False)
        assert s["kept"] == 4, s


def test_retry_after_is_honoured(sdss, tmp_path, monkeypatch):
    import urllib3.util.retry

    slept = []
    monkeypatch.setattr(urllib3.util.retry.time, "sleep", slept.append)  # the injected clock: no real wait
    p = spectrum_path(*GOOD[0][:4])
    sdss.actions = {p: ["429-retry-after-7", "500"]}
    cat = pd.DataFrame(GOOD[:1], columns=["PLATE", "MJD", "FIBERID", "RUN2D", "T", "F", "G", "R", "S"])
    s = download(cat, tmp_path / "out", sdss.url, concurrency=1, retries=3, timeout=30, backoff=0.5, progress=False)
    assert s["downloaded"] == 1 and sdss.requests[p] == 3
    assert slept[0] == 7 and slept[1] == pytest.approx(1.0)  # what the server asked, then backoff * 2**1


def test_one_fetch_per_output(sdss, tmp_path, capsys):
    import os

    from stellarparams.cli import main
    from stellarparams.files import OutputBusy, output_lock

    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(OutputBusy, match=f"PID {os.getpid()}"):
            fetch(3, out, sql_url=sql_url(sdss), sas_url=sdss.url, sample="first", **FAST)
        rc = main(["fetch", "--n", "3", "--out", str(out), "--sql-url", sql_url(sdss), "--sas-url", sdss.url, "--quiet"])
        assert rc == 3 and str(out) in capsys.readouterr().err
    assert sdss.queries == [] and sum(sdss.requests.values()) == 0  # the busy runs did nothing
    assert fetch(3, out, sql_url=sql_url(sdss), sas_url=sdss.url, sample="first", **FAST)["spectra"]["downloaded"] == 3
