"""A stand-in KFP API server on loopback that records every REST request it is sent.

No KFP backend runs here; this answers the v2beta1 endpoints kfp.Client uses with
minimal valid JSON, so a test can assert the exact payload graft sends.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class KfpRecorder:
    def __init__(self):
        self.requests: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                recorder.requests.append({"method": self.command, "path": self.path, "body": body})
                path = self.path.split("?")[0]
                if path.endswith("/healthz"):
                    return self._reply({"multi_user": False})
                if "/experiments" in path and self.command == "POST":
                    return self._reply(
                        {"experiment_id": "exp-1", "display_name": (body or {}).get("display_name")}
                    )
                if "/experiments" in path:
                    return self._reply({"experiments": [], "total_size": 0})
                if "/recurringruns" in path and self.command == "POST":
                    return self._reply({"recurring_run_id": "rr-1", **(body or {})})
                if "/recurringruns" in path and self.command == "DELETE":
                    return self._reply({})
                if "/recurringruns" in path:
                    # KFP's own mix: the list key is camelCase, the rows are snake_case.
                    row = {"recurring_run_id": "rr-1", "display_name": "graft-retrain", "status": "ENABLED",
                           "trigger": {"cron_schedule": {"cron": "0 0 3 * * *"}}}  # fmt: skip
                    return self._reply({"recurringRuns": [row], "total_size": 1})
                if "/runs" in path and self.command == "POST":
                    return self._reply({"run_id": "run-1", **(body or {})})
                return self._reply({})

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def posts(self, fragment: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST" and fragment in r["path"]]
