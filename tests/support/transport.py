"""A recording asyncio transport for socketless protocol tests: what was written, whether reading is
paused, whether it was closed."""

from __future__ import annotations


class RecordingTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.reading, self.closed = True, False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0  # everything written is taken at once

    def close(self) -> None:
        self.closed = True

    abort = close
