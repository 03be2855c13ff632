"""Slack app mode: the Web API with a bot token, one thread per failure episode.

https://api.slack.com/methods/chat.postMessage
https://api.slack.com/methods/chat.update
https://api.slack.com/web#responses  (HTTP 200 with {"ok": false, "error": ...})

How threads are kept across restarts and replicas: see nomaflowd/threads.py.
"""

from __future__ import annotations

import json
from typing import Any

from nomaflowd.alerts import Alert
from nomaflowd.threads import ENDS, STARTS, THREADED
from nomaflowd.transports.base import (
    DeliveryError,
    Rendered,
    Sent,
    TransportError,
    retry_after,
)
from nomaflowd.transports.chat import one_line
from nomaflowd.transports.slack import Slack, escape


def slack_error(data: bytes) -> str:
    """`channel_not_found` from `{"ok": false, "error": "channel_not_found"}`, else ""."""
    try:
        doc = json.loads(data)
    except ValueError:
        return ""
    error = doc.get("error") if isinstance(doc, dict) else None
    return " ".join(str(error).split())[:200] if error else ""


# Threads this process started that it keeps in memory (the table has them all).
STARTED_KEPT = 1024


class SlackApp(Slack):
    """`type = "slack"` with `bot_token`: chat.postMessage to a channel, threads by episode."""

    ordered = True   # one at a time, in order: a reply never overtakes its thread's start
    threads = True

    def __init__(self, name: str, settings: Any, *, timeout: float) -> None:
        super().__init__(name, settings, timeout=timeout)
        # (recipient, job, episode) -> the thread this process started (see threads.py);
        # an episode that never ends (no success, or on_recovery off) stays: the oldest go
        # past STARTED_KEPT. The chat_threads table keeps every one anyway.
        self._started: dict[tuple[str, str, str], dict[str, str]] = {}

    def api(self, method: str) -> str:
        return f"{self.settings['api_url']}/{method}"

    def endpoint(self) -> str:
        return self.api("chat.postMessage")

    def request(self, payload: dict[str, Any], method: str = "chat.postMessage") -> Rendered:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        headers = {"Authorization": f"Bearer {self.settings['bot_token'].reveal()}",
                   "Content-Type": "application/json; charset=utf-8"}
        return Rendered(self.api(method), body, headers, method)

    def payload(self, alert: Alert, recipient: str) -> dict[str, Any]:
        payload = super().payload(alert, recipient)
        if "channel" not in payload:  # an app has no channel of its own, unlike a webhook
            raise TransportError("no channel: Slack app mode needs a #channel recipient or"
                                 " the transport's default_channel")
        return payload

    def send(self, alert: Alert, recipient: str) -> str | Sent:
        payload = self.payload(alert, recipient)
        thread = alert.thread or {}
        key = (recipient, alert.job_id, thread["episode"]) if "episode" in thread else None
        root = thread if thread.get("ts") else self._started.get(key) if key else None
        if root is not None and alert.kind in THREADED:
            payload["thread_ts"] = root["ts"]
        answer = self.call(self.request(payload))
        detail = f"HTTP 200 ok ts {answer.get('ts')}"
        if root is not None:
            detail += f" in thread {root['ts']}"
            if alert.kind == ENDS and key is not None:
                self._started.pop(key, None)
                detail += self.end_episode(root, alert)
            return detail
        if alert.kind == STARTS and key is not None and answer.get("ts"):
            started = {"episode": key[2], "ts": str(answer["ts"]),
                       "channel": str(answer.get("channel") or payload["channel"]),
                       "text": payload["text"]}
            if len(self._started) >= STARTED_KEPT:  # the oldest episode that never ended
                self._started.pop(next(iter(self._started)))
            self._started[key] = started
            return Sent(detail + ", thread started", started)
        return detail

    def end_episode(self, root: dict[str, str], alert: Alert) -> str:
        """Edit the episode's first message to say it is over; the reply already went out,
        so a refusal here is only noted in the detail."""
        text = f"{self.text(alert)}\n_Episode over. It began with:_ {root['text']}"
        update = {"channel": root["channel"], "ts": root["ts"], "text": text,
                  "attachments": [{"color": alert.colour or "#2eb67d", "fallback": text,
                                   "text": escape(one_line(f"recovered: {alert.job_id}"))}]}
        try:
            self.call(self.request(update, "chat.update"))
        except (TransportError, DeliveryError) as exc:
            return f"; the first message was not updated: {exc}"
        return ", first message updated"

    def call(self, request: Rendered) -> dict[str, Any]:
        """POST a Web API call; its answer, or the typed exception (ok: false included)."""
        status, data, headers = self.post(request.url, request.body, request.headers)
        return self.answer(status, data, headers, request)

    def answer(self, status: int, data: bytes, headers: Any, request: Rendered
               ) -> dict[str, Any]:
        if status != 200:
            raise self.refusal(status, data, headers)
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise self.refusal(status, data, headers)
        if doc.get("ok") is not True:
            # Slack answers HTTP 200 with the error: channel_not_found, not_in_channel,
            # invalid_auth, ... The detail is masked on the way out (Transport.mask).
            raise DeliveryError(self.mask(f"{request.what} {slack_error(data) or 'not ok'}"))
        return doc

    def accept(self, status: int, data: bytes, headers: Any, request: Rendered) -> str:
        """For deliver() (digests): ok: true is SENT."""
        doc = self.answer(status, data, headers, request)
        return f"HTTP 200 ok ts {doc.get('ts')}"

    def describe_refusal(self, status: int, data: bytes, headers: Any) -> str:
        error = slack_error(data)
        if error:
            return f"HTTP {status} {error}" + retry_after(status, headers)
        return super().describe_refusal(status, data, headers)
