"""A long schemathesis run against `candlewick serve`: every operation of its OpenAPI document, valid and invalid
requests drawn from the schemas, checked for no 5xx, the declared statuses, content types and error bodies;
then the server must still be healthy and answer a completion. (tests/test_api_fuzz.py is the short run.)

    python scripts/fuzz_api.py                              # tests/data/llama-tiny, 5 minutes
    python scripts/fuzz_api.py --model MODEL --minutes 30 --workers 4
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "tests" / "data" / "llama-tiny"))
    ap.add_argument("--minutes", type=float, default=5.0, help="time budget (default: 5)")
    ap.add_argument("--workers", type=int, default=2, help="schemathesis workers (default: 2)")
    ap.add_argument("--max-examples", type=int, default=2000, help="per operation (default: 2000)")
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "candlewick.cli", "serve", args.model, "--port", str(port),
                               "--model-id", "m", "--max-active", "16", "--log-level", "warning"])
    try:
        for _ in range(600):
            try:
                if get(base + "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        run = subprocess.run(["schemathesis", "run", f"{base}/openapi.json", "--checks", CHECKS,
                              "--max-examples", str(args.max_examples), "--max-time", str(int(args.minutes * 60)),
                              "--workers", str(args.workers)])
        status, health = get(base + "/health")
        status2, done = get(base + "/v1/completions", {"model": "m", "prompt": "Hello", "max_tokens": 4})
        print(f"after the run: /health {status} {health}; a completion: {status2} {done['choices'][0]['text']!r}")
        if run.returncode != 0 or status != 200 or status2 != 200:
            sys.exit(1)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
