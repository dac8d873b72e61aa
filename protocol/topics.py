"""MQTT topic layout of the whole wire: every channel of every message family (stdlib only).

    edgepatch/v1/<fleet>/<device>/state           DeviceState, retained
    edgepatch/v1/<fleet>/<device>/lwt             DeviceState "offline" (the device's last will), retained
    edgepatch/v1/<fleet>/<device>/patch           PatchUpdate
    edgepatch/v1/<fleet>/<device>/metrics         Metrics
    edgepatch/v1/<fleet>/bundle                   BundleAnnouncement, retained (fleet-wide)
    edgepatch/v1/<fleet>/<device>/canoe/meta      CanoeMeta        device -> cloud, retained
    edgepatch/v1/<fleet>/<device>/canoe/request   CanoeRequest     target -> cloud
    edgepatch/v1/<fleet>/<helper>/canoe/task      CanoeTask        cloud -> helper  (relayed)
    edgepatch/v1/<fleet>/<helper>/canoe/offer     CanoeOffer       helper -> cloud
    edgepatch/v1/<fleet>/<target>/canoe/reply     CanoeReply       cloud -> target  (relayed)
    edgepatch/v1/<fleet>/fl/round                 FlRoundOpen/FlStop  server -> every device (fleet-wide)
    edgepatch/v1/<fleet>/<device>/fl/join         FlJoin           device -> server
    edgepatch/v1/<fleet>/<device>/fl/update       FlUpdate         device -> server
    edgepatch/v1/<fleet>/<device>/ack             PatchAck         cloud -> device  (relayed: stored patches)

On a device channel the sender is the device named in the topic, except on the RELAYED channels, where
the cloud writes to the device named in the topic (the addressee). Fleet and device names are single
topic levels: no '/', no MQTT wildcards, nothing that starts with '$' (brokers treat '$' topics
specially), so a topic always parses back into exactly one address.
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
    LWT = "lwt"
    BUNDLE = "bundle"  # fleet-wide
    CANOE_META = "canoe/meta"
    CANOE_REQUEST = "canoe/request"
    CANOE_TASK = "canoe/task"
    CANOE_OFFER = "canoe/offer"
    CANOE_REPLY = "canoe/reply"
    FL_ROUND = "fl/round"  # fleet-wide
    FL_JOIN = "fl/join"
    FL_UPDATE = "fl/update"
    ACK = "ack"  # the companion's application-level acknowledgement of stored patches (issue 12)


FLEET_CHANNELS = frozenset({Channel.BUNDLE, Channel.FL_ROUND})
RELAYED_CHANNELS = frozenset({Channel.CANOE_TASK, Channel.CANOE_REPLY, Channel.ACK})  # cloud -> the device in the topic
DEVICE_CHANNELS: tuple[Channel, ...] = tuple(c for c in Channel if c not in FLEET_CHANNELS)


@dataclass(frozen=True)
class TopicAddress:
    fleet: str
    device_id: str | None  # None for fleet-wide topics
    channel: Channel


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it can be one topic level, else raise TopicError naming the problem."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise TopicError(
            f"{what} {name!r} is not a valid topic level: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return name


def _channel(channel: Channel | str) -> Channel:
    try:
        return Channel(channel)
    except ValueError:
        raise TopicError(f"unknown channel {channel!r}; known: {[c.value for c in Channel]}") from None


def device_topic(fleet: str, device_id: str, channel: Channel | str) -> str:
    channel = _channel(channel)
    if channel in FLEET_CHANNELS:
        raise TopicError(f"the {channel.value} topic is fleet-wide: use fleet_topic(fleet, channel)")
    return f"{PREFIX}/{check_name(fleet, 'fleet')}/{check_name(device_id, 'device id')}/{channel.value}"


def fleet_topic(fleet: str, channel: Channel | str) -> str:
    channel = _channel(channel)
    if channel not in FLEET_CHANNELS:
        raise TopicError(f"the {channel.value} channel has a device level: use device_topic(...)")
    return f"{PREFIX}/{check_name(fleet, 'fleet')}/{channel.value}"


def bundle_topic(fleet: str) -> str:
    return fleet_topic(fleet, Channel.BUNDLE)


def fleet_filter(fleet: str, channel: Channel | str) -> str:
    """Subscription filter for one channel of every device of a fleet (e.g. `.../+/patch`); `fleet` may
    be '+' for every fleet."""
    channel = _channel(channel)
    level = fleet if fleet == "+" else check_name(fleet, "fleet")
    if channel in FLEET_CHANNELS:
        return f"{PREFIX}/{level}/{channel.value}"
    return f"{PREFIX}/{level}/+/{channel.value}"


def shared_filter(group: str, topic_filter: str) -> str:
    """MQTT 5 shared subscription: several cloud workers in `group` split the matching messages."""
    return f"$share/{check_name(group, 'share group')}/{topic_filter}"


_FLEET_LEAVES = {c.value: c for c in FLEET_CHANNELS}
_DEVICE_LEAVES = {c.value: c for c in DEVICE_CHANNELS}


def parse_topic(topic: str) -> TopicAddress:
    """Split a concrete topic (no wildcards) into fleet, device and channel, or raise TopicError."""
    prefix = PREFIX + "/"
    if not isinstance(topic, str) or not topic.startswith(prefix):
        raise TopicError(f"topic {topic!r} is not under {PREFIX}/")
    levels = topic[len(prefix):].split("/")
    if len(levels) < 2:
        raise TopicError(f"topic {topic!r} has too few levels")
    rest = "/".join(levels[1:])
    if rest in _FLEET_LEAVES:
        return TopicAddress(check_name(levels[0], "fleet"), None, _FLEET_LEAVES[rest])
    if len(levels) < 3:
        raise TopicError(f"topic {topic!r} has too few levels")
    leaf = "/".join(levels[2:])
    if leaf not in _DEVICE_LEAVES:
        raise TopicError(f"topic {topic!r}: unknown channel {leaf!r}")
    return TopicAddress(check_name(levels[0], "fleet"), check_name(levels[1], "device id"), _DEVICE_LEAVES[leaf])


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching ('+' one level, '#' the rest; `$share/<group>/` prefixes are stripped)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and not topic_filter.startswith("$"):
        return False  # wildcards never match '$' topics
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels) or (f != "+" and f != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)
