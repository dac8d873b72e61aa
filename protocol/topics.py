"""MQTT topic layout of the device <-> cloud wire (stdlib only).

    edgepatch/v1/<fleet>/<device>/state          DeviceState, retained
    edgepatch/v1/<fleet>/<device>/patch          PatchUpdate
    edgepatch/v1/<fleet>/<device>/metrics        Metrics
    edgepatch/v1/<fleet>/<device>/help/request   HelpRequest
    edgepatch/v1/<fleet>/<device>/help/offer     HelpOffer
    edgepatch/v1/<fleet>/<device>/lwt            DeviceState "offline" (the device's last will), retained
    edgepatch/v1/<fleet>/bundle                  BundleAnnouncement, retained (current bundle version)

Fleet and device names are single topic levels: no '/', no MQTT wildcards, nothing that starts with '$'
(brokers treat '$' topics specially), so a topic always parses back into exactly one address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

PREFIX = "edgepatch/v1"
BUNDLE_LEVEL = "bundle"

# Letters, digits, '.', '_', '-'; starts with a letter or digit; at most 64 characters.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class TopicError(ValueError):
    """A topic or a name that cannot be part of one."""


class Channel(StrEnum):
    STATE = "state"
    PATCH = "patch"
    METRICS = "metrics"
    HELP_REQUEST = "help/request"
    HELP_OFFER = "help/offer"
    LWT = "lwt"
    BUNDLE = "bundle"  # fleet-wide; has no device level


DEVICE_CHANNELS: tuple[Channel, ...] = tuple(c for c in Channel if c is not Channel.BUNDLE)


@dataclass(frozen=True)
class TopicAddress:
    fleet: str
    device_id: str | None  # None for fleet-wide topics (bundle)
    channel: Channel


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it can be one topic level, else raise TopicError naming the problem."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise TopicError(
            f"{what} {name!r} is not a valid topic level: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return name


def device_topic(fleet: str, device_id: str, channel: Channel | str) -> str:
    channel = Channel(channel)
    if channel is Channel.BUNDLE:
        raise TopicError("the bundle topic is fleet-wide: use bundle_topic(fleet)")
    return f"{PREFIX}/{check_name(fleet, 'fleet')}/{check_name(device_id, 'device id')}/{channel.value}"


def bundle_topic(fleet: str) -> str:
    return f"{PREFIX}/{check_name(fleet, 'fleet')}/{BUNDLE_LEVEL}"


def fleet_filter(fleet: str, channel: Channel | str) -> str:
    """Subscription filter for one channel of every device of a fleet (e.g. `.../+/patch`)."""
    channel = Channel(channel)
    if channel is Channel.BUNDLE:
        return bundle_topic(fleet)
    return f"{PREFIX}/{check_name(fleet, 'fleet')}/+/{channel.value}"


def shared_filter(group: str, topic_filter: str) -> str:
    """MQTT 5 shared subscription: several cloud workers in `group` split the matching messages."""
    return f"$share/{check_name(group, 'share group')}/{topic_filter}"


def parse_topic(topic: str) -> TopicAddress:
    """Split a concrete topic (no wildcards) into fleet, device and channel, or raise TopicError."""
    prefix = PREFIX + "/"
    if not isinstance(topic, str) or not topic.startswith(prefix):
        raise TopicError(f"topic {topic!r} is not under {PREFIX}/")
    levels = topic[len(prefix):].split("/")
    if len(levels) == 2 and levels[1] == BUNDLE_LEVEL:
        return TopicAddress(check_name(levels[0], "fleet"), None, Channel.BUNDLE)
    if len(levels) < 3:
        raise TopicError(f"topic {topic!r} has too few levels")
    fleet, device_id, rest = levels[0], levels[1], "/".join(levels[2:])
    try:
        channel = Channel(rest)
    except ValueError:
        raise TopicError(f"topic {topic!r}: unknown channel {rest!r}") from None
    if channel is Channel.BUNDLE:
        raise TopicError(f"topic {topic!r}: 'bundle' is a fleet-level topic, not a device channel")
    return TopicAddress(check_name(fleet, "fleet"), check_name(device_id, "device id"), channel)
