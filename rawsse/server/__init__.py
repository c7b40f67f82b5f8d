"""One serving process's I/O: the epoll loop, listeners, socket transports, HTTP/1.1, SSE streams.

Nothing here knows what a push means: an HTTP/1.1 connection turns bytes into protocol-neutral
requests (``exchange``) and answers into bytes; the APNs meaning lives in ``rawsse.apns``.
"""
