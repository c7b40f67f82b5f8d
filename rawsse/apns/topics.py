"""Which ``apns-topic`` a provider may push to: the topic rules of token and certificate auth.

Apple ("Sending notification requests to APNs", apns-topic; the reasons in "Handling
notification responses from APNs"): a topic is an app's bundle ID, or the bundle ID with the
suffix of a push type (``.voip``, ``.complication``, ``.pushkit.fileprovider``, ...). With token
auth the header is required (``400 MissingTopic``); with a certificate it may be left out and
the certificate's topic, the ``UID`` of its subject, is used (jchambers/pushy
``ValidatingPushNotificationHandlerFactory`` reads ``UID=``). A topic that is not a bundle ID
at all is ``400 BadTopic``; one the provider may not push to is ``400 TopicDisallowed``.
"""

from __future__ import annotations

import re
from typing import Iterable

# Apple, "Sending notification requests to APNs" (apns-push-type and apns-topic): the topic of
# each push type that is not the bundle ID itself.
CERTIFICATE_SUFFIXES = (b".voip", b".complication", b".pushkit.fileprovider")
TOKEN_SUFFIXES = CERTIFICATE_SUFFIXES + (
    b".location-query", b".push-type.liveactivity", b".voip-ptt", b".push-type.widgets",
    b".push-type.controls")
MAX_TOPIC_BYTES = 255  # a bundle ID with a suffix; longer is no topic Apple issues
# A bundle ID: alphanumerics and hyphens in dot-separated labels (Apple, "CFBundleIdentifier").
_BUNDLE_ID = re.compile(rb"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\Z")


def is_topic(topic: bytes) -> bool:
    return len(topic) <= MAX_TOPIC_BYTES and _BUNDLE_ID.match(topic) is not None


def with_suffixes(topics: Iterable[bytes], suffixes: tuple[bytes, ...]) -> frozenset[bytes]:
    """Every topic a set of bundle IDs covers: each one, and each with a push-type suffix."""
    return frozenset(t + s for t in topics for s in (b"", *suffixes))


def topic_refusal(topic: bytes | None, allowed: frozenset[bytes] | None,
                  certificate_topic: bytes | None) -> str | None:
    """Apple's reason for pushing to ``topic`` (None: the header is absent), or None.
    ``allowed`` is None when any well-formed topic may be pushed to (token auth without
    ``--topics``); ``certificate_topic`` is set on a certificate connection."""
    if topic is None:
        return None if certificate_topic is not None else "MissingTopic"
    if not is_topic(topic):
        return "BadTopic"
    if allowed is not None and topic not in allowed:
        return "TopicDisallowed"
    return None
