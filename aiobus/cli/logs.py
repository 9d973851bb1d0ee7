"""Log output for the commands: text for a terminal, or JSON lines for journald, Loki and
other collectors (``--log-format json``).

A JSON line is one object: ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``,
``message`` (the %-arguments filled in), then the record's extra fields as they were
given (the broker tags connection records with ``conn``, ``client``, ``pid``, ``uid``),
and ``exception`` with the traceback when there is one. Values JSON cannot hold are
written as their ``str()``.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any, Final

__all__ = ["LOG_FORMATS", "JsonFormatter", "setup_logging"]

LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in data:
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def setup_logging(level: str, log_format: str, text_format: str = TEXT_FORMAT) -> None:
    """Log records of ``level`` and above to stderr, as ``log_format`` says."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(text_format))
    logging.basicConfig(level=level, handlers=[handler])
