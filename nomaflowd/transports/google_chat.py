"""Google Chat space webhooks: one thread per job, by `threadKey`.

https://developers.google.com/workspace/chat/quickstart/webhooks
https://developers.google.com/workspace/chat/api/reference/rest/v1/spaces.messages/create
https://developers.google.com/workspace/chat/format-messages
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from nomaflowd.alerts import Alert
from nomaflowd.transports.base import Rendered
from nomaflowd.transports.chat import ChatPreset, clip, facts

TEXT_MAX = 4096           # Google Chat's limit for `text`
# Reply in the job's thread; when a thread cannot be found (or the space has no threads),
# start a new one instead of failing.
SUMMARY_ROOM = 500  # characters the summary keeps beside the run's link
REPLY_OPTION = ("messageReplyOption", "REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD")


def thread_key(job_id: str) -> str:
    """`nomaflow-<job_id>`: a job's failures, reminders and recovery share one thread."""
    return f"nomaflow-{job_id}"


class GoogleChat(ChatPreset):
    """`type = "webhook"`, `preset = "google_chat"`."""

    preset = "google_chat"
    digest_budget = 4000

    def escape(self, text: str) -> str:
        """`<` and `>` are the platform's mention and link markup (`<users/all>` would notify
        the whole space); there is no escape for them, so they become single angle quotes."""
        return text.replace("<", "\u2039").replace(">", "\u203a")

    def link(self, url: str, label: str) -> str:
        return f"<{url.replace('|', '%7C').replace('>', '%3E')}|{label}>"

    def endpoint_url(self, threaded: bool) -> str:
        url = self.endpoint()
        if not threaded:
            return url
        # The URL's own query as written (re-encoding it would send the key and token in
        # a form of their own), with the reply option in place of any it had.
        parts = urlsplit(url)
        query = [p for p in parts.query.split("&")
                 if p and p.split("=", 1)[0] != REPLY_OPTION[0]]
        return urlunsplit(parts._replace(query="&".join([*query, "=".join(REPLY_OPTION)])))

    def message(self, alert: Alert) -> dict[str, Any]:
        # The summary is clipped, not the link after it: a clip through `<url|label>` left
        # broken markup. A link too long to leave the summary room is left to the card's
        # button.
        link = " " + self.link(alert.url, alert.link_text) if alert.url else ""
        if TEXT_MAX - len(link) < SUMMARY_ROOM:
            link = ""
        text = clip(self.summary(alert), TEXT_MAX - len(link)) + link
        body: dict[str, Any] = {"text": text, "cardsV2": [self.card(alert)]}
        if alert.job_id:
            body["thread"] = {"threadKey": thread_key(alert.job_id)}
        return body

    def card(self, alert: Alert) -> dict[str, Any]:
        """The state in its colour, the facts and a button to the run (card text is HTML)."""
        word = html.escape(alert.subject_word)
        state = f"<b>{word}</b>"
        if alert.colour:
            state = f'<font color="{html.escape(alert.colour)}">{state}</font>'
        widgets: list[dict[str, Any]] = [{"textParagraph": {"text": state}}]
        widgets += [{"decoratedText": {"topLabel": label, "text": html.escape(clip(value, 1000)),
                                       "wrapText": True}} for label, value in facts(alert)]
        if alert.url:
            widgets.append({"buttonList": {"buttons": [
                {"text": alert.link_text, "onClick": {"openLink": {"url": alert.url}}}]}})
        return {"cardId": "nomaflow", "card": {"sections": [{"widgets": widgets}]}}

    def render(self, alert: Alert, recipient: str) -> Rendered:
        return self.post_json(self.message(alert), threaded=bool(alert.job_id))

    def digest_message(self, head: str, lines: list[str], worst: Alert, digest_id: str
                       ) -> dict[str, Any]:
        # Many jobs in one message: no one job's thread.
        return {"text": clip("\n".join([f"\U0001f4e6 *{head}*", *lines, f"_{digest_id}_"]),
                             TEXT_MAX)}
