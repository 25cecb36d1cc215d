"""Where events go: `build_sink` makes the sink a configuration names.

The protocol every sink follows, the attempt record and the plumbing HTTP sinks share are in
`watcher.sinks.base`; each type has a module of its own.
"""

from __future__ import annotations

from watcher.clock import Clock
from watcher.config import SinkConfig
from watcher.sinks.base import CampaignNames, Sink


def build_sink(
    config: SinkConfig,
    *,
    clock: Clock,
    version: str,
    campaign_names: CampaignNames | None = None,
) -> Sink:
    """The sink for `config.type`.

    `campaign_names` (campaign id -> name, as the watcher last read them) is for sinks that show a
    lead's campaign to people by name (Slack); a webhook sends the lead as the API wrote it.
    """
    # Imported here: each sink type's module (and its library) loads only when configured.
    if config.type == "webhook":
        from watcher.sinks.webhook import WebhookSink

        return WebhookSink(config, clock=clock, version=version)
    if config.type == "slack":
        from watcher.sinks.slack import SlackSink

        return SlackSink(config, clock=clock, version=version, campaign_names=campaign_names)
    if config.type in ("nats", "amqp", "redis"):
        from watcher.sinks.broker import broker_sink

        return broker_sink(config, clock=clock, version=version)
    raise ValueError(f"unknown sink type {config.type!r}")
