"""Load tools: simulated devices (``rawsse devices``), the push sender (``rawsse push``), their
shared non-blocking client code and the latency stamps carried in ``apns-id``.
"""
