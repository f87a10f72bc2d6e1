"""Tests for fastrlhf.data."""
