"""Analyses that passes share: weight layouts, channel coupling groups, activation capture and
structural hashing. Each module answers one question about a graph; none changes it."""
