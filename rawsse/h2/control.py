"""Connection-level HTTP/2 frames (RFC 9113 §6): SETTINGS, PING, WINDOW_UPDATE, RST_STREAM,
GOAWAY and PRIORITY as an ``H2Connection`` takes them, and the per-second flood budgets.

Request streams (HEADERS, CONTINUATION, DATA) and the answers stay in ``connection.py``; these
functions change the connection's windows, settings and counters, and call back into it to send
what a window now lets through or to go away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rawsse.h2 import frames as f

if TYPE_CHECKING:
    from rawsse.h2.connection import H2Connection

CONTROL_FRAMES_PER_SECOND = 1000


def on_control(conn: "H2Connection", type_: int, stream_id: int, flags: int, payload: Any) -> None:
    """Any frame but HEADERS, CONTINUATION and DATA."""
    if type_ == f.WINDOW_UPDATE:
        on_window_update(conn, stream_id, payload)
    elif type_ == f.RST_STREAM:
        on_rst_stream(conn, stream_id, payload)
    elif type_ == f.SETTINGS:
        on_settings(conn, stream_id, flags, payload)
    elif type_ == f.PING:
        on_ping(conn, stream_id, flags, payload)
    elif type_ == f.PRIORITY:  # §5.3.2: priority signals are ignored
        if stream_id == 0:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            conn.reset_stream(stream_id, f.FRAME_SIZE_ERROR)
        count_control(conn)
    elif type_ == f.GOAWAY:
        on_goaway(conn, stream_id)
    elif type_ == f.PUSH_PROMISE:
        raise f.ConnectionError_(f.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
    # §5.5: frames of unknown types are ignored


def on_window_update(conn: "H2Connection", stream_id: int, payload: Any) -> None:
    if len(payload) != 4:
        raise f.ConnectionError_(f.FRAME_SIZE_ERROR, "WINDOW_UPDATE length is not 4")
    increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
    if stream_id == 0:
        if increment == 0:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        conn.send_window += increment
        if conn.send_window > f.MAX_WINDOW:
            raise f.ConnectionError_(f.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
        conn.unblock()
        return
    stream = conn.streams.get(stream_id)
    if stream is None:
        if stream_id > conn.last_stream_id:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
        return
    if increment == 0:
        conn.reset_stream(stream_id, f.PROTOCOL_ERROR)
        return
    stream.window += increment
    if stream.window > f.MAX_WINDOW:
        conn.reset_stream(stream_id, f.FLOW_CONTROL_ERROR)
    elif stream.pending is not None:
        conn.send_data(stream_id, stream)
        conn.schedule_flush()


def on_rst_stream(conn: "H2Connection", stream_id: int, payload: Any) -> None:
    if stream_id == 0:
        raise f.ConnectionError_(f.PROTOCOL_ERROR, "RST_STREAM on stream 0")
    if len(payload) != 4:
        raise f.ConnectionError_(f.FRAME_SIZE_ERROR, "RST_STREAM length is not 4")
    if stream_id > conn.last_stream_id:
        raise f.ConnectionError_(f.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
    stream = conn.streams.pop(stream_id, None)
    if stream is None:
        return
    budget(conn)
    conn.resets += 1
    if conn.resets > conn.reset_limit:
        raise f.ConnectionError_(f.ENHANCE_YOUR_CALM, "too many stream resets (rapid reset)")
    if conn.goaway_id >= 0 and not conn.streams:
        conn.schedule_flush()


def on_settings(conn: "H2Connection", stream_id: int, flags: int, payload: Any) -> None:
    if stream_id != 0:
        raise f.ConnectionError_(f.PROTOCOL_ERROR, "SETTINGS on a stream")
    if flags & f.ACK:
        if payload:
            raise f.ConnectionError_(f.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
        return
    if len(payload) % 6:
        raise f.ConnectionError_(f.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    count_control(conn)
    for key, value in f.parse_settings(bytes(payload)):
        if key == f.INITIAL_WINDOW_SIZE:
            if value > f.MAX_WINDOW:
                raise f.ConnectionError_(f.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above 2^31-1")
            delta = value - conn.peer_window  # §6.9.2: applies to every open stream
            conn.peer_window = value
            for stream in conn.streams.values():
                stream.window += delta
        elif key == f.MAX_FRAME_SIZE:
            if not f.MIN_FRAME_SIZE <= value <= f.MAX_FRAME_SIZE_LIMIT:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
            conn.peer_frame_size = value
        elif key == f.ENABLE_PUSH and value > 1:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
        # HEADER_TABLE_SIZE: our answers never index, so the peer's table size is moot
    conn.out += f.SETTINGS_ACK
    conn.unblock()


def on_ping(conn: "H2Connection", stream_id: int, flags: int, payload: Any) -> None:
    if stream_id != 0:
        raise f.ConnectionError_(f.PROTOCOL_ERROR, "PING on a stream")
    if len(payload) != 8:
        raise f.ConnectionError_(f.FRAME_SIZE_ERROR, "PING length is not 8")
    if flags & f.ACK:
        return
    count_control(conn)
    conn.out += f.ping_ack(bytes(payload))
    conn.schedule_flush()


def on_goaway(conn: "H2Connection", stream_id: int) -> None:
    if stream_id != 0:
        raise f.ConnectionError_(f.PROTOCOL_ERROR, "GOAWAY on a stream")
    # The client opens no more streams: answer what it sent, then close.
    conn.go_away(f.NO_ERROR, "ClientGoingAway")


def budget(conn: "H2Connection") -> None:
    """Flood counters count per second: a new second starts them again."""
    now = conn.host.loop.now
    if now - conn.budget_start >= 1.0:
        conn.budget_start = now
        conn.resets = 0
        conn.control = 0


def count_control(conn: "H2Connection") -> None:
    budget(conn)
    conn.control += 1
    if conn.control > CONTROL_FRAMES_PER_SECOND:
        raise f.ConnectionError_(f.ENHANCE_YOUR_CALM, "control frame flood")
