"""JSON-lines logging shared by every service. Prompt and output text are never logged here."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from meshserve.common.telemetry import current_trace_ids

# The request being served by the current task, so every log line of a request can be found.
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# The id its caller chose for it, if any (at the gateway: the mesh's id is always its own).
current_client_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("client_request_id", default="")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = current_request_id.get()
        if request_id:
            entry["request_id"] = request_id
        client_request_id = current_client_request_id.get()
        if client_request_id:
            entry["client_request_id"] = client_request_id
        trace_id, span_id = current_trace_ids()
        if trace_id:
            entry["trace_id"], entry["span_id"] = trace_id, span_id
        for key, value in getattr(record, "fields", {}).items():
            entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(service: str, level: str = "info", log_file: str = "") -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    try:
        root.setLevel(level.upper())
    except ValueError as exc:
        raise SystemExit(f"meshserve: unknown log level {level!r}; use debug, info, warning or error") from exc
