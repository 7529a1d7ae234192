"""The MQTT topic namespace ``edgeadapt/v1/<fleet>/<device>/<channel>``.

Channels (see ``docs/telemetry.md``):

========  =========  ========  ======================================================
channel   direction  retained  content
========  =========  ========  ======================================================
birth     device ->  yes       bundle id/version, runtime version, profile, boot id
state     device ->  yes       ``online`` / ``offline``; the Last Will is ``offline``
tele      device ->  no        batches of telemetry records
event     device ->  no        batches of event records
ack       device ->  no        batches of command acknowledgements
cmd       -> device  no        signed command envelopes
========  =========  ========  ======================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from runtime.errors import ConfigError

ROOT = "edgeadapt/v1"

#: Allowed fleet and device ids: no MQTT wildcards, no '/', no '$' prefix.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Channel(str, Enum):
    """The last topic level: what the message carries."""

    BIRTH = "birth"
    STATE = "state"
    TELEMETRY = "tele"
    EVENT = "event"
    ACK = "ack"
    COMMAND = "cmd"


#: Channels whose payload is a record batch (``records.decode_batch``).
BATCH_CHANNELS = (Channel.TELEMETRY, Channel.EVENT, Channel.ACK)


@dataclass(frozen=True)
class TopicAddress:
    """Where a message came from: fleet, device and channel."""

    fleet: str
    device: str
    channel: Channel


def check_id(value: str, what: str) -> str:
    """Return ``value`` if it is a valid fleet/device id, else raise :class:`ConfigError`."""
    if not ID_PATTERN.match(value):
        raise ConfigError(
            f"{what} {value!r}: expected 1-64 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    return value


def topic(fleet: str, device: str, channel: Channel) -> str:
    """The topic of ``channel`` for one device."""
    return f"{ROOT}/{fleet}/{device}/{channel.value}"


def parse_topic(name: str) -> TopicAddress | None:
    """Split a topic of the namespace; None for anything else (other roots, bad ids)."""
    parts = name.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != ROOT:
        return None
    fleet, device, channel = parts[2], parts[3], parts[4]
    if not (ID_PATTERN.match(fleet) and ID_PATTERN.match(device)):
        return None
    try:
        return TopicAddress(fleet, device, Channel(channel))
    except ValueError:
        return None


def collector_filters(fleet: str = "+", share_group: str | None = None) -> list[str]:
    """Subscription filters of a collector.

    Record channels go through the MQTT 5 shared subscription ``$share/<group>/...`` when
    ``share_group`` is set, so several collectors split the load. ``birth`` and ``state`` are
    always plain subscriptions: they are retained, and brokers do not send retained messages to
    shared subscriptions.
    """
    data = [f"{ROOT}/{fleet}/+/{c.value}" for c in BATCH_CHANNELS]
    if share_group:
        check_id(share_group, "share group")
        data = [f"$share/{share_group}/{f}" for f in data]
    return [
        *data,
        f"{ROOT}/{fleet}/+/{Channel.BIRTH.value}",
        f"{ROOT}/{fleet}/+/{Channel.STATE.value}",
    ]
