"""The build tests use the suite's shared artifacts (tests/conftest.py `artifacts`)."""
