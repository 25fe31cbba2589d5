#!/usr/bin/env python3
"""Summarise schemathesis NDJSON reports per operation of an OpenAPI document.

    fuzz_report.py OPENAPI REPORT [REPORT ...] [--header 'Name: value']

OPENAPI is a file path or an http(s) URL (JSON, or YAML when PyYAML is importable). Each REPORT
is an NDJSON event stream written by `schemathesis run --report ndjson --report-ndjson-path
FILE` (a directory means every *.ndjson in it); several reports (e.g. a tenant run and an
admin run) are merged. Every recorded request is mapped back to its templated operation
(`/v1/jobs/0190.../cancel` -> `POST /v1/jobs/{id}/cancel`; path segments are split before
percent-decoding, so a parameter value holding %2F stays one segment).

Prints `METHOD /path  requests=N 2xx=N 4xx=N 5xx=N` per operation of the document (with
` no_response=N` / ` failed_checks=N` appended when non-zero), `unmatched ...` lines for
requests outside the document (the coverage phase's undocumented methods: one per method, and
one per path that got a 5xx / no response / a failed check), the failed schemathesis checks, then
`requests=TOTAL operations=N without_2xx=K five_xx=M` (` failed_checks=C` appended when
non-zero). Exits 1 when an operation of the document never got a 2xx, any response was a 5xx
or a recorded check failed (e.g. response_schema_conformance); 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.request
from collections import Counter, defaultdict
from urllib.parse import unquote, urlsplit

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace", "query")


def load_document(location: str, headers: list[str]) -> dict:
    if re.match(r"^https?://", location):
        req = urllib.request.Request(location)
        for h in headers:
            name, _, value = h.partition(":")
            req.add_header(name.strip(), value.strip())
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read().decode("utf-8")
    else:
        with open(location, encoding="utf-8") as f:
            text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        import yaml  # PyYAML; present in the schemathesis venv

        return yaml.safe_load(text)


class Template:
    """One path template of the document, matched against raw (still percent-encoded) paths."""

    def __init__(self, path: str):
        self.path = path
        self.segments = []
        for seg in path.split("/"):
            parts = re.split(r"(\{[^}/]+\})", seg)
            if len(parts) == 1:
                self.segments.append(("lit", seg))
            else:
                rx = "".join("(?:.+?)" if p.startswith("{") else re.escape(p) for p in parts if p)
                self.segments.append(("rx", re.compile(rf"^{rx}$", re.S)))
        # Concrete paths win over templated ones (`/jobs/stats` before `/jobs/{id}`).
        self.rank = (sum(1 for k, _ in self.segments if k == "lit"), len(re.sub(r"\{[^}]*\}", "", path)))

    def matches(self, raw_segments: list[str]) -> bool:
        if len(raw_segments) != len(self.segments):
            return False
        for (kind, want), raw in zip(self.segments, raw_segments):
            value = unquote(raw)
            if kind == "lit":
                if value != want:
                    return False
            elif not want.match(value):
                return False
        return True


def base_paths(doc: dict) -> list[str]:
    """Path prefixes the document's servers put in front of its paths (longest first), plus ''."""
    out = {""}
    for server in doc.get("servers") or []:
        url = server.get("url") or ""
        for name, var in (server.get("variables") or {}).items():
            url = url.replace("{" + name + "}", str(var.get("default", "")))
        path = urlsplit(url).path if "://" in url else url
        out.add(path.rstrip("/"))
    return sorted(out, key=len, reverse=True)


def iter_interactions(report_paths: list[str]):
    """(method, uri, status or None, [failed check names], (case method, case path template))
    for every recorded request."""
    files = []
    for p in report_paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".ndjson"))
        elif os.path.isfile(p):
            files.append(p)
        else:
            print(f"fuzz_report: no such report: {p}", file=sys.stderr)
            sys.exit(2)
    if not files:
        print("fuzz_report: no NDJSON report in " + " ".join(report_paths), file=sys.stderr)
        sys.exit(2)
    seen = set()
    for path in files:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    print(f"fuzz_report: {path}:{lineno}: unreadable line skipped", file=sys.stderr)
                    continue
                if not isinstance(event, dict):
                    continue
                body = event.get("ScenarioFinished") or event.get("FuzzScenarioFinished")
                if not isinstance(body, dict):
                    continue
                recorder = body.get("recorder") or {}
                checks = recorder.get("checks") or {}
                for case_id, inter in (recorder.get("interactions") or {}).items():
                    req = inter.get("request") or {}
                    key = (path, case_id, inter.get("timestamp"), req.get("method"), req.get("uri"))
                    if key in seen:
                        continue
                    seen.add(key)
                    resp = inter.get("response")
                    failed = [c.get("name") for c in checks.get(case_id) or [] if c.get("status") == "failure"]
                    case = ((recorder.get("cases") or {}).get(case_id) or {}).get("value") or {}
                    template = ((case.get("method") or "").upper(), case.get("path") or "")
                    status = (resp or {}).get("status_code")
                    yield (req.get("method") or "").upper(), req.get("uri") or "", status, failed, template


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("openapi", help="OpenAPI document: file path or URL")
    ap.add_argument("reports", nargs="+", help="schemathesis NDJSON report file(s) or directories")
    ap.add_argument("--header", "-H", action="append", default=[], help="header for fetching the document")
    ap.add_argument(
        "--no-2xx-by-design",
        action="append",
        default=[],
        metavar="'METHOD /path'",
        help="an operation that never answers 2xx by design (a browser form answering 303); "
        "it must still get responses, none of them 5xx",
    )
    args = ap.parse_args()

    try:
        doc = load_document(args.openapi, args.header)
    except Exception as e:  # noqa: BLE001
        print(f"fuzz_report: cannot load {args.openapi}: {e}", file=sys.stderr)
        return 2

    operations: list[tuple[str, str]] = []
    templates: dict[str, Template] = {}
    for path, item in (doc.get("paths") or {}).items():
        if not isinstance(item, dict):
            continue
        templates[path] = Template(path)
        for method in METHODS:
            if isinstance(item.get(method), dict):
                operations.append((method.upper(), path))
    documented = set(operations)
    ordered_templates = sorted(templates.values(), key=lambda t: t.rank, reverse=True)
    prefixes = base_paths(doc)

    def resolve(method: str, uri: str, case_op: tuple[str, str]) -> tuple[str, str] | None:
        """The operation a request belongs to; (method, template) even when the method is undocumented.

        The sent path decides; where it fits several templates (`DELETE /v1/lora/init` when only
        `POST /v1/lora/init` and `DELETE /v1/lora/{id}` exist) the operation schemathesis
        generated the case for breaks the tie."""
        raw_path = urlsplit(uri).path or "/"
        candidates = []
        for prefix in prefixes:
            if prefix and not (raw_path == prefix or raw_path.startswith(prefix + "/")):
                continue
            segs = (raw_path[len(prefix):] or "/").split("/")
            candidates += [(method, t.path) for t in ordered_templates if t.matches(segs)]
        if case_op in documented and case_op in candidates:
            return case_op
        for op in candidates:
            if op in documented:
                return op
        if candidates:
            return candidates[0]
        # A path parameter sent with a raw `/` (the server accepts LoRA ids both ways).
        return case_op if case_op in documented else None

    stats: dict[tuple[str, str], Counter] = defaultdict(Counter)
    failed_checks: Counter = Counter()
    unmatched: dict[tuple[str, str], Counter] = defaultdict(Counter)
    total = 0
    for method, uri, status, failed, case_op in iter_interactions(args.reports):
        total += 1
        op = resolve(method, uri, case_op)
        if op is None:
            bucket = unmatched[(method, "(no path of the document)")]
        elif op not in documented:
            bucket = unmatched[op]
        else:
            bucket = stats[op]
        bucket["requests"] += 1
        if status is None:
            bucket["no_response"] += 1
        else:
            bucket[f"{status // 100}xx"] += 1
        if failed:
            bucket["failed_checks"] += 1
            for name in failed:
                failed_checks[(f"{op[0]} {op[1]}" if op else f"{method} {uri}", name)] += 1

    def line(c: Counter) -> str:
        s = f"requests={c['requests']} 2xx={c['2xx']} 4xx={c['4xx']} 5xx={c['5xx']}"
        for extra in ("no_response", "failed_checks"):
            if c[extra]:
                s += f" {extra}={c[extra]}"
        return s

    width = max((len(m) + 1 + len(p) for m, p in operations), default=0)
    without_2xx = 0
    five_xx = 0
    n_failed = 0
    exempt = {tuple(x.split(" ", 1)) for x in args.no_2xx_by_design}
    for op in sorted(exempt - set(operations)):
        print(f"fuzz_report: --no-2xx-by-design {' '.join(op)} is not in the document", file=sys.stderr)
        return 2
    for op in operations:
        c = stats[op]
        if op in exempt:
            without_2xx += c["requests"] == 0
            five_xx += c["5xx"]
            n_failed += c["failed_checks"]
            print(f"{(op[0] + ' ' + op[1]).ljust(width)}  {line(c)}  (no 2xx by design)")
            continue
        without_2xx += c["2xx"] == 0
        five_xx += c["5xx"]
        n_failed += c["failed_checks"]
        print(f"{(op[0] + ' ' + op[1]).ljust(width)}  {line(c)}" + ("" if c["2xx"] else "  <- no 2xx"))
    # Requests outside the document (mostly the coverage phase trying undocumented methods):
    # one line per method, plus one per path where something went wrong.
    by_method: dict[str, Counter] = defaultdict(Counter)
    for op, c in sorted(unmatched.items()):
        five_xx += c["5xx"]
        n_failed += c["failed_checks"]
        by_method[op[0]].update(c)
        if c["5xx"] or c["no_response"] or c["failed_checks"]:
            print(f"unmatched {op[0]} {op[1]}  {line(c)}")
    for method, c in sorted(by_method.items()):
        print(f"unmatched {method}  {line(c)}")
    for (label, name), n in sorted(failed_checks.items()):
        print(f"failed check {name}: {label} x{n}")
    summary = f"requests={total} operations={len(operations)} without_2xx={without_2xx} five_xx={five_xx}"
    if n_failed:
        summary += f" failed_checks={n_failed}"
    print(summary)
    return 1 if (without_2xx or five_xx or n_failed) else 0


if __name__ == "__main__":
    sys.exit(main())
