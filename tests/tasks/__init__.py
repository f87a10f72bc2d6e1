"""Tests for fastrlhf.tasks."""
