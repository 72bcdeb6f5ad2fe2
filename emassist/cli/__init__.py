"""Command-line entry point (`emassist ...`): parses arguments, calls the library layers below."""
