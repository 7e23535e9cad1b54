"""Integrations with data-preparation stacks that embed the engine."""
