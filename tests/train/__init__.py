"""Tests for fastrlhf.train."""
