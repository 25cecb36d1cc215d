"""Test helpers shared by the suites: loopback HTTP receivers and their verification."""
