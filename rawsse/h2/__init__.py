"""HTTP/2 (RFC 9113) served with prior knowledge: frames, HPACK, and the connection object."""
