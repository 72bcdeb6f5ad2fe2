"""Unit tests of the library: one function or class at a time, no servers."""
