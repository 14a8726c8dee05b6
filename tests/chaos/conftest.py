"""The toxiproxy fixtures live in tests/conftest.py (the canary tests use them too)."""

from tests.conftest import add_toxic, toxic_link, toxiproxy_server  # noqa: F401
