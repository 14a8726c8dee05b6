"""What the tests share: real upstreams, the proxy runner (in-process and as a process), redis-server and
toxiproxy launchers, metric reads with a per-test baseline, and waits on a condition with a generous
deadline. Fixtures that wrap them live in tests/conftest.py; nothing here is a fixture itself."""
