"""Builders shared by the tests: tiny corpora, demonstrations, rankings and configs."""
