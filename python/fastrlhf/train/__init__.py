"""Trainers for each InstructGPT step, labelers and shared training helpers."""
