"""A local stand-in for the Hugging Face Hub's HTTP API, for ``--push-to-hub`` tests: the
calls ``huggingface_hub`` makes to create a repository, validate a card's YAML and commit files
(every file sent inline, as the hub asks for small ones), recorded -- a real HTTP server that
the real client talks to, nothing patched."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.calls: list[tuple[str, str]] = []
        self.cards: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.calls.append(("GET", self.path))
                self._json(404, {"error": "not found"})

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                hub.calls.append(("POST", path))
                if path == "/api/repos/create":
                    body = json.loads(data)
                    name = body["name"] if "/" in body["name"] else \
                        f"{body.get('organization') or 'user'}/{body['name']}"
                    hub.repos[name] = body
                    return self._json(200, {"url": f"{hub.url}/{name}", "name": name})
                if path == "/api/validate-yaml":
                    hub.cards.append(json.loads(data)["content"])
                    return self._json(200, {"errors": [], "warnings": []})
                parts = path.split("/")  # /api/models/<owner>/<name>/<verb>/<rev>
                repo = "/".join(parts[3:5])
                if len(parts) >= 6 and parts[5] == "preupload":
                    files = json.loads(data)["files"]
                    return self._json(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files]})
                if len(parts) >= 6 and parts[5] == "commit":
                    for line in data.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            hub.files.setdefault(repo, {})[value["path"]] = \
                                base64.b64decode(value["content"])
                    return self._json(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'0' * 40}",
                                            "commitOid": "0" * 40, "pullRequestUrl": None})
                self._json(404, {"error": path})

        return Handler
