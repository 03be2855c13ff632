"""Generic webhook: the default JSON body or a `${var}` template, optional HMAC signature."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time

from nomaflowd.alerts import Alert, digest_headline
from nomaflowd.transports.base import Rendered
from nomaflowd.transports.http_client import HttpTransport

VARIABLE_RE = re.compile(r"\$\{([a-z_]+)\}")


def substitute(template: str, values: dict[str, str]) -> str:
    """Fill `${name}`; in a JSON template each value is JSON-escaped so it cannot break the body."""
    as_json = template.lstrip().startswith(("{", "["))

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            return match.group(0)
        value = values[name]
        return json.dumps(value, ensure_ascii=False)[1:-1] if as_json else value

    return VARIABLE_RE.sub(one, template)


class Webhook(HttpTransport):
    type = "webhook"

    def endpoint(self) -> str:
        return str(self.settings["url"].reveal())

    def render(self, alert: Alert, recipient: str) -> Rendered:
        template = self.settings.get("body_template")
        body = substitute(template, alert.variables()) if template else self._default_body(alert)
        return self.request(body.encode("utf-8"))

    def request(self, body: bytes, url: str | None = None, what: str = "") -> Rendered:
        return Rendered(url or self.endpoint(), body, self.signed_headers(body), what)

    def _default_body(self, alert: Alert) -> str:
        values = alert.variables()
        body = {k: (values[k] or None) for k in ("job_id", "run_id", "state", "triggered_by",
                                                 "started_at", "finished_at", "error", "url")}
        body.update(alert=alert.kind, level=alert.level, summary=alert.summary())
        if values["step"]:
            body["step"] = values["step"]
        if values["message"]:
            body["message"] = values["message"]
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))

    def signed_headers(self, body: bytes, now: float | None = None) -> dict[str, str]:
        headers = {name: (v if isinstance(v, str) else v.reveal())
                   for name, v in self.settings.get("headers", {}).items()}
        secret = self.settings.get("signing_secret")
        if secret is not None:
            stamp = str(int(now if now is not None else time.time()))
            mac = hmac.new(secret.reveal().encode(), stamp.encode() + b"." + body, hashlib.sha256)
            headers["X-Nomaflow-Timestamp"] = stamp
            headers["X-Nomaflow-Signature"] = "sha256=" + mac.hexdigest()
        return headers

    def render_digest(self, alerts: list[Alert], recipient: str, digest_id: str
                      ) -> list[Rendered]:
        """One JSON body with an `alerts` array of default bodies (body_template not applied)."""
        return [self.request(json.dumps({
            "digest": digest_id,
            "count": len(alerts),
            "summary": digest_headline(alerts),
            "alerts": [json.loads(self._default_body(a)) for a in alerts],
        }, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))]
