"""End-to-end test harness: real origins, a raw HTTP client, the real fastproxy master."""
